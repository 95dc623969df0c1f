//! A connection writer that sends the messages ready at the same moment in one `write`.
//!
//! capnp-futures' write queue flushes after every message. Behind a plain buffer that makes
//! each message its own `write` syscall and, with `TCP_NODELAY`, its own packet, even when a
//! connection has ten replies ready at once. [`coalescing`] splits the writer in two:
//!
//! - [`CoalescingWriter`], given to the RPC system, buffers and answers `flush` at once,
//!   only noting that the buffer holds something;
//! - [`Flusher`], a future polled *in the same task* as the RPC system, does the real flush
//!   when that task is next polled. The write queue drains every message already waiting
//!   before it yields, so they all leave together. The delay is one turn of the task, never
//!   a timer, and a message written while the task is otherwise idle still leaves at once.
//!
//! Same task, because both halves poll one socket: a socket keeps one waker per direction,
//! and two tasks polling it could lose each other's wake-up. The flusher completes only when
//! the writer is closed or a flush fails; the failure is kept and returned by the writer's
//! next call, so the RPC system sees the connection break as it would have without this.

use futures::io::{AsyncWrite, BufWriter};
use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

struct Shared<W> {
    buffer: BufWriter<W>,
    /// Bytes were written since the last real flush.
    dirty: bool,
    /// The writer was closed (closing flushes), or a flush failed.
    done: bool,
    /// A failed flush, as (kind, message), for the writer's next call.
    failed: Option<(io::ErrorKind, String)>,
    flusher: Option<Waker>,
    /// The writer's waker, left when the socket was full under a write or close. The socket
    /// keeps one waker per direction, and the RPC system polls its write queue as a sub-task
    /// with a waker of its own: whichever of the two halves polled last gets the socket's
    /// wake-up, so the flusher passes it on to the writer (else the write queue would wait
    /// forever for a wake-up the flusher took).
    writer: Option<Waker>,
}

/// The half the RPC system writes to. See the module docs.
pub struct CoalescingWriter<W> {
    shared: Rc<RefCell<Shared<W>>>,
}

/// The half that flushes. See the module docs.
pub struct Flusher<W> {
    shared: Rc<RefCell<Shared<W>>>,
}

/// Wraps `writer` in a buffer of `capacity` bytes split into its two halves.
pub fn coalescing<W: AsyncWrite + Unpin>(writer: W, capacity: usize) -> (CoalescingWriter<W>, Flusher<W>) {
    let shared = Rc::new(RefCell::new(Shared {
        buffer: BufWriter::with_capacity(capacity, writer),
        dirty: false,
        done: false,
        failed: None,
        flusher: None,
        writer: None,
    }));
    (CoalescingWriter { shared: shared.clone() }, Flusher { shared })
}

impl<W> Shared<W> {
    fn check(&self) -> io::Result<()> {
        match &self.failed {
            Some((kind, message)) => Err(io::Error::new(*kind, message.clone())),
            None => Ok(()),
        }
    }

    fn wake_flusher(&mut self) {
        if let Some(waker) = self.flusher.take() {
            waker.wake();
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for CoalescingWriter<W> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut shared = self.shared.borrow_mut();
        shared.check()?;
        let written = Pin::new(&mut shared.buffer).poll_write(cx, buf);
        if written.is_pending() {
            shared.writer = Some(cx.waker().clone());
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = self.shared.borrow_mut();
        shared.check()?;
        shared.dirty = true;
        shared.wake_flusher();
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = self.shared.borrow_mut();
        shared.check()?;
        let closed = Pin::new(&mut shared.buffer).poll_close(cx);
        if closed.is_pending() {
            shared.writer = Some(cx.waker().clone());
        }
        if closed.is_ready() {
            shared.dirty = false;
            shared.done = true;
            shared.wake_flusher();
        }
        closed
    }
}

impl<W: AsyncWrite + Unpin> Flusher<W> {
    /// Sends what is still buffered, for a connection closed from this side (a graceful
    /// shutdown) whose RPC system is dropped rather than closed.
    pub async fn finish(&mut self) {
        futures::future::poll_fn(|cx| {
            let mut shared = self.shared.borrow_mut();
            if !shared.dirty || shared.done {
                return Poll::Ready(());
            }
            match Pin::new(&mut shared.buffer).poll_flush(cx) {
                Poll::Ready(_) => {
                    shared.dirty = false;
                    Poll::Ready(())
                }
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }
}

impl<W: AsyncWrite + Unpin> Future for Flusher<W> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut shared = self.shared.borrow_mut();
        if let Some(writer) = shared.writer.take() {
            writer.wake();
        }
        if shared.dirty && !shared.done {
            match Pin::new(&mut shared.buffer).poll_flush(cx) {
                Poll::Ready(Ok(())) => shared.dirty = false,
                Poll::Ready(Err(err)) => {
                    shared.failed = Some((err.kind(), err.to_string()));
                    shared.done = true;
                }
                // The socket is full; it wakes this task when it has room.
                Poll::Pending => return Poll::Pending,
            }
        }
        if shared.done {
            return Poll::Ready(());
        }
        shared.flusher = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::AsyncWriteExt as _;
    use futures::task::noop_waker;
    use std::io::Read as _;

    /// An in-memory sink that records each write it receives.
    #[derive(Default, Clone)]
    struct Sink {
        writes: Rc<RefCell<Vec<Vec<u8>>>>,
        fail: Rc<RefCell<bool>>,
    }

    impl AsyncWrite for Sink {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            if *self.fail.borrow() {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "peer went away")));
            }
            self.writes.borrow_mut().push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
        let waker = noop_waker();
        Pin::new(future).poll(&mut Context::from_waker(&waker))
    }

    #[test]
    fn messages_flushed_before_the_flusher_runs_leave_in_one_write() {
        let sink = Sink::default();
        let (mut writer, mut flusher) = coalescing(sink.clone(), 8192);
        assert!(poll_once(&mut flusher).is_pending());
        futures::executor::block_on(async {
            for message in [&b"first"[..], b"second", b"third"] {
                writer.write_all(message).await.unwrap();
                writer.flush().await.unwrap();
            }
        });
        assert!(sink.writes.borrow().is_empty(), "nothing may leave before the flusher runs");
        assert!(poll_once(&mut flusher).is_pending());
        assert_eq!(*sink.writes.borrow(), vec![b"firstsecondthird".to_vec()]);
    }

    #[test]
    fn a_failed_flush_ends_the_flusher_and_fails_the_next_write() {
        let sink = Sink::default();
        let (mut writer, mut flusher) = coalescing(sink.clone(), 8192);
        futures::executor::block_on(async {
            writer.write_all(b"lost").await.unwrap();
            writer.flush().await.unwrap();
        });
        *sink.fail.borrow_mut() = true;
        assert!(poll_once(&mut flusher).is_ready());
        let err = futures::executor::block_on(writer.write_all(b"more")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn finish_sends_what_is_buffered() {
        let sink = Sink::default();
        let (mut writer, mut flusher) = coalescing(sink.clone(), 8192);
        futures::executor::block_on(async {
            writer.write_all(b"last ack").await.unwrap();
            writer.flush().await.unwrap();
            flusher.finish().await;
        });
        assert_eq!(*sink.writes.borrow(), vec![b"last ack".to_vec()]);
    }

    #[test]
    fn closing_flushes_and_ends_the_flusher() {
        let sink = Sink::default();
        let (mut writer, mut flusher) = coalescing(sink.clone(), 8192);
        futures::executor::block_on(async {
            writer.write_all(b"bye").await.unwrap();
            writer.close().await.unwrap();
        });
        assert_eq!(*sink.writes.borrow(), vec![b"bye".to_vec()]);
        assert!(poll_once(&mut flusher).is_ready());
    }

    /// Over a real loopback socket, a message larger than the buffer and the socket's send
    /// queue arrives whole and in order while both halves are polled by one task.
    #[test]
    fn a_large_message_crosses_a_real_socket_whole() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let payload: Vec<u8> = (0..8 << 20).map(|i| (i % 251) as u8).collect();
        let expected = payload.clone();
        let reader = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().unwrap();
            let mut received = Vec::new();
            socket.read_to_end(&mut received).unwrap();
            received
        });
        futures::executor::block_on(async move {
            let socket = async_io_stream(addr);
            let (mut writer, flusher) = coalescing(socket, 8192);
            let writing = async move {
                for chunk in payload.chunks(100_000) {
                    writer.write_all(chunk).await.unwrap();
                    writer.flush().await.unwrap();
                }
                writer.close().await.unwrap();
            };
            futures::future::join(writing, flusher).await;
        });
        assert!(reader.join().unwrap() == expected, "the bytes arrived changed");
    }

    /// A blocking std socket seen as an `AsyncWrite` (each write completes at once): enough to
    /// exercise the buffer's partial writes against a real kernel send queue.
    fn async_io_stream(addr: std::net::SocketAddr) -> futures::io::AllowStdIo<std::net::TcpStream> {
        futures::io::AllowStdIo::new(std::net::TcpStream::connect(addr).unwrap())
    }
}
