//! Sits between a connection's socket and capnp's reader and follows the Cap'n Proto stream
//! framing (segment table, then segments), for two reasons:
//!
//! - **Memory.** capnp allocates (and zero-fills) a message's whole claimed size as soon as it
//!   has read the segment table, so a peer announcing a 16 MiB frame and sending nothing would
//!   cost 16 MiB per connection. Here a frame is buffered until all its bytes have arrived and
//!   only then handed to capnp, so memory follows the bytes peers actually send. A table capnp
//!   will refuse (no segments, too many, over the size limit) is passed through at once, so
//!   capnp closes the connection and says why.
//! - **Time.** The [`FrameClock`] tells the connection's watchdog how long the current frame
//!   has been arriving; a connection that never completes its first frame, or stalls inside
//!   one, is closed after the frame timeout. (An idle connection between frames is fine: it
//!   may hold capabilities or a subscription.)

use crate::budget::{ConnectionBudget, LARGE_FRAME};
use futures::AsyncRead;
use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

/// Shared between the reader and the connection's watchdog.
#[derive(Debug)]
pub struct FrameClock {
    /// When the frame now being received started; `None` between frames.
    started: Cell<Option<Instant>>,
    /// When the last frame was complete (or the connection opened).
    last_frame: Cell<Instant>,
    /// The server holds this connection's reading back (byte budget): not the peer's fault.
    held: Cell<bool>,
    /// The peer sent a frame the limits refuse (capnp closes the connection over it).
    refused: Cell<bool>,
}

impl FrameClock {
    /// A new connection counts as "inside a frame" from the start: it owes its first frame.
    pub fn new() -> Rc<FrameClock> {
        Rc::new(FrameClock { started: Cell::new(Some(Instant::now())), last_frame: Cell::new(Instant::now()), held: Cell::new(false), refused: Cell::new(false) })
    }

    /// How long since the peer last completed a frame.
    pub fn quiet_for(&self) -> std::time::Duration {
        self.last_frame.get().elapsed()
    }

    /// Whether the peer sent a frame the limits refuse (too large, too many segments).
    pub fn refused(&self) -> bool {
        self.refused.get()
    }

    /// How long the current frame has been arriving, if one is.
    pub fn pending_for(&self) -> Option<std::time::Duration> {
        if self.held.get() {
            return None;
        }
        self.started.get().map(|t| t.elapsed())
    }
}

/// capnp refuses segment tables with this many segments or more.
const MAX_SEGMENTS: usize = 512;

enum State {
    /// Collecting the first 8 bytes of a frame.
    Header { have: usize },
    /// Collecting the rest of the segment table (lengths of segments 2.. and padding).
    Table { remaining: usize, count: usize },
    /// Collecting segment data.
    Body { remaining: u64 },
    /// A frame capnp will refuse was seen: everything goes straight through from now on.
    PassThrough,
}

pub struct FrameWatch<R> {
    inner: R,
    clock: Rc<FrameClock>,
    state: State,
    /// The frame now arriving, held back from capnp until it is complete.
    pending: Vec<u8>,
    /// Bytes capnp may read, from `ready_at` on.
    ready: Vec<u8>,
    ready_at: usize,
    max_frame_bytes: u64,
    budget: Option<Rc<ConnectionBudget>>,
    /// A large frame whose body may not be read until its charge fits the budgets.
    uncharged: Option<usize>,
}

impl<R> FrameWatch<R> {
    pub fn new(inner: R, clock: Rc<FrameClock>, max_frame_bytes: usize) -> FrameWatch<R> {
        FrameWatch {
            inner,
            clock,
            state: State::Header { have: 0 },
            pending: Vec::new(),
            ready: Vec::new(),
            ready_at: 0,
            max_frame_bytes: max_frame_bytes as u64,
            budget: None,
            uncharged: None,
        }
    }

    /// Charges large frames to `budget` (see [`crate::budget`]) before reading their bodies.
    pub fn with_budget(mut self, budget: Rc<ConnectionBudget>) -> FrameWatch<R> {
        self.budget = Some(budget);
        self
    }

    fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.pending[at..at + 4].try_into().expect("4 bytes"))
    }

    /// Follows `bytes` through the framing; complete frames move to `ready`.
    fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.clock.started.get().is_none() {
                self.clock.started.set(Some(Instant::now()));
            }
            let want = match self.state {
                State::Header { have } => 8 - have,
                State::Table { remaining, .. } => remaining,
                State::Body { remaining } => usize::try_from(remaining).unwrap_or(usize::MAX),
                State::PassThrough => bytes.len(),
            };
            let take = want.min(bytes.len());
            let (now, rest) = bytes.split_at(take);
            bytes = rest;
            self.pending.extend_from_slice(now);
            self.state = match self.state {
                State::Header { have } if have + take < 8 => State::Header { have: have + take },
                State::Header { .. } => {
                    let count = (self.u32_at(0) as usize).wrapping_add(1);
                    let first_bytes = self.u32_at(4) as u64 * 8;
                    if count == 0 || count >= MAX_SEGMENTS || first_bytes > self.max_frame_bytes {
                        self.clock.refused.set(true);
                        State::PassThrough
                    } else {
                        // The table is (count + 1) u32s rounded up to 8 bytes; 8 are in.
                        let table = ((count + 1) * 4).div_ceil(8) * 8;
                        State::Table { remaining: table - 8, count }
                    }
                }
                State::Table { remaining, count } if remaining > take => State::Table { remaining: remaining - take, count },
                State::Table { count, .. } => {
                    let words: u64 = (0..count).map(|i| self.u32_at(4 + 4 * i) as u64).sum();
                    if words * 8 > self.max_frame_bytes {
                        self.clock.refused.set(true);
                        State::PassThrough
                    } else {
                        let bytes = (words * 8) as usize;
                        if let Some(budget) = self.budget.as_ref().filter(|_| bytes >= LARGE_FRAME) {
                            if !budget.try_charge(bytes, None) {
                                self.uncharged = Some(bytes);
                            }
                        }
                        State::Body { remaining: words * 8 }
                    }
                }
                State::Body { remaining } => State::Body { remaining: remaining - take as u64 },
                State::PassThrough => State::PassThrough,
            };
            match self.state {
                State::Body { remaining: 0 } => {
                    self.release();
                    self.state = State::Header { have: 0 };
                    self.clock.started.set(None);
                    self.clock.last_frame.set(Instant::now());
                }
                State::PassThrough => self.release(),
                _ => {}
            }
        }
    }

    fn release(&mut self) {
        if self.ready_at == self.ready.len() {
            self.ready.clear();
            self.ready_at = 0;
        }
        self.ready.append(&mut self.pending);
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for FrameWatch<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        loop {
            if this.ready_at < this.ready.len() {
                let n = (this.ready.len() - this.ready_at).min(buf.len());
                buf[..n].copy_from_slice(&this.ready[this.ready_at..this.ready_at + n]);
                this.ready_at += n;
                return Poll::Ready(Ok(n));
            }
            if let (Some(bytes), Some(budget)) = (this.uncharged, &this.budget) {
                if !budget.try_charge(bytes, Some(cx.waker())) {
                    // Over budget: stop reading this connection until charges are released.
                    this.clock.held.set(true);
                    return Poll::Pending;
                }
                this.uncharged = None;
                if this.clock.held.replace(false) {
                    // The rest of the frame is owed from now, not from before the hold.
                    this.clock.started.set(Some(Instant::now()));
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match Pin::new(&mut this.inner).poll_read(cx, &mut chunk) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(0)),
                Poll::Ready(Ok(n)) => this.observe(&chunk[..n]),
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::AsyncReadExt as _;

    fn frame(segments: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(segments.len() as u32 - 1).to_le_bytes());
        for s in segments {
            out.extend_from_slice(&((s.len() / 8) as u32).to_le_bytes());
        }
        if out.len() % 8 != 0 {
            out.extend_from_slice(&[0; 4]);
        }
        for s in segments {
            out.extend_from_slice(s);
        }
        out
    }

    #[test]
    fn frames_are_released_whole_and_only_when_complete() {
        let clock = FrameClock::new();
        let mut watch = FrameWatch::new(futures::io::empty(), clock.clone(), 1 << 20);
        let one = frame(&[&[1; 16]]);
        let three = frame(&[&[1; 8], &[2; 24], &[3; 8]]);
        for bytes in [&one, &three] {
            for (i, b) in bytes.iter().enumerate() {
                watch.observe(std::slice::from_ref(b));
                let complete = i == bytes.len() - 1;
                assert_eq!(clock.pending_for().is_none(), complete, "byte {i} of {}", bytes.len());
                assert_eq!(watch.ready.len() - watch.ready_at, if complete { bytes.len() } else { 0 });
            }
            watch.ready_at = watch.ready.len();
        }
        watch.observe(&three[..5]);
        assert!(clock.pending_for().is_some());
        assert_eq!(watch.ready.len() - watch.ready_at, 0, "nothing of a partial frame reaches capnp");
    }

    #[test]
    fn what_capnp_refuses_passes_through_at_once() {
        for header in [[255u8, 255, 255, 255, 1, 0, 0, 0], [0, 0, 0, 0, 255, 255, 255, 127]] {
            let mut watch = FrameWatch::new(futures::io::empty(), FrameClock::new(), 1 << 20);
            watch.observe(&header);
            assert_eq!(watch.ready, header, "handed on for capnp to refuse");
        }
    }

    #[test]
    fn reads_deliver_the_stream_unchanged() {
        let mut stream = frame(&[&[7; 64]]);
        stream.extend(frame(&[&[8; 8], &[9; 16]]));
        let mut watch = FrameWatch::new(futures::io::Cursor::new(stream.clone()), FrameClock::new(), 1 << 20);
        let mut out = Vec::new();
        futures::executor::block_on(watch.read_to_end(&mut out)).unwrap();
        assert_eq!(out, stream);
    }
}
