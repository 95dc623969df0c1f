//! A TCP proxy on 127.0.0.1 for fault tests: it can delay each direction, drop the server's
//! replies, refuse connections, cut every connection (now, or after a given number of bytes in
//! one direction, which lands anywhere inside a frame, and again after the next so many bytes), and counts the connections it accepts.
//! Started with [`Proxy::start_framed`] it also splits what clients send into Cap'n Proto
//! frames, so it can drop one whole `Session.append` call and pass the next ones.
//! Started with [`Proxy::start_balancing`] it stands for a TCP load balancer in front of
//! several nodes: each new connection goes to the next node in turn, skipping nodes that
//! refuse it.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    delay_ms: AtomicU64,
    drop_replies: AtomicBool,
    refuse: AtomicBool,
    accepted: AtomicU64,
    open: Mutex<Vec<TcpStream>>,
    /// One flag per connection's client-to-server direction: while set, its bytes wait here.
    holds: Mutex<Vec<Arc<AtomicBool>>>,
    held: Mutex<Vec<Arc<AtomicBool>>>,
    /// Chunks held back and not yet forwarded, across connections.
    held_chunks: AtomicU64,
    /// Split client-to-server bytes into frames (set before any connection).
    framed: bool,
    /// Drop the append call this many calls from now (0: drop none).
    drop_append_in: AtomicU64,
    dropped_calls: AtomicU64,
    /// `(replies, n)`: cut every connection once `n` more bytes have gone that way; the
    /// front one is armed.
    cut_plan: Mutex<std::collections::VecDeque<(bool, u64)>>,
    cuts_at_offset: AtomicU64,
    /// Where new connections go: one address, or several taken in turn.
    upstreams: Mutex<Vec<String>>,
    next_upstream: AtomicU64,
}

pub struct Proxy {
    pub addr: String,
    state: Arc<State>,
}

impl Proxy {
    pub fn start(upstream: &str) -> Proxy {
        Proxy::spawn(&[upstream], State::default())
    }

    /// A proxy that forwards what clients send one whole Cap'n Proto frame at a time.
    pub fn start_framed(upstream: &str) -> Proxy {
        Proxy::spawn(&[upstream], State { framed: true, ..State::default() })
    }

    /// A balancer: connections go to `upstreams` in turn, past any that refuses.
    pub fn start_balancing(upstreams: &[&str]) -> Proxy {
        Proxy::spawn(upstreams, State::default())
    }

    /// Where new connections go from now on, the first one to the first of `upstreams`
    /// (connections already open stay where they are).
    pub fn set_upstreams(&self, upstreams: &[&str]) {
        *self.state.upstreams.lock().unwrap() = upstreams.iter().map(|u| u.to_string()).collect();
        self.state.next_upstream.store(0, Ordering::SeqCst);
    }

    /// The first upstream that accepts, starting with the next in turn.
    fn connect_upstream(state: &State) -> Option<TcpStream> {
        let upstreams = state.upstreams.lock().unwrap().clone();
        let first = state.next_upstream.fetch_add(1, Ordering::SeqCst) as usize;
        (0..upstreams.len()).find_map(|i| TcpStream::connect(&upstreams[(first + i) % upstreams.len()]).ok())
    }

    fn spawn(upstreams: &[&str], state: State) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        *state.upstreams.lock().unwrap() = upstreams.iter().map(|u| u.to_string()).collect();
        let state = Arc::new(state);
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                if shared.refuse.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Some(server) = Proxy::connect_upstream(&shared) else { continue };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut open = shared.open.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                }
                let hold = Arc::new(AtomicBool::new(false));
                shared.holds.lock().unwrap().push(hold.clone());
                pump(client.try_clone().unwrap(), server.try_clone().unwrap(), shared.clone(), false, hold);
                pump(server, client, shared.clone(), true, Arc::new(AtomicBool::new(false)));
            }
        });
        Proxy { addr, state }
    }

    /// Adds `ms` of latency in each direction (a round trip costs 2 × ms more).
    pub fn set_delay(&self, ms: u64) {
        self.state.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// While set, bytes from the server are read and thrown away.
    pub fn drop_replies(&self, on: bool) {
        self.state.drop_replies.store(on, Ordering::SeqCst);
    }

    /// While set, new connections are accepted and closed at once.
    pub fn refuse(&self, on: bool) {
        self.state.refuse.store(on, Ordering::SeqCst);
    }

    /// Cuts every open connection in both directions.
    pub fn cut(&self) {
        self.state.cut_all();
    }

    /// Plans cuts: for each `(replies, bytes)` in turn, once `bytes` more bytes have been
    /// forwarded towards the server (or, with `replies`, towards the client) since the previous
    /// cut, forwards exactly up to that offset and cuts every connection.
    pub fn plan_cuts(&self, plan: Vec<(bool, u64)>) {
        *self.state.cut_plan.lock().unwrap() = plan.into_iter().map(|(replies, bytes)| (replies, bytes.max(1))).collect();
    }

    /// Planned cuts that have not happened yet.
    pub fn cuts_pending(&self) -> usize {
        self.state.cut_plan.lock().unwrap().len()
    }

    /// Cuts made by [`Proxy::plan_cuts`] so far.
    pub fn cuts_at_offset(&self) -> u64 {
        self.state.cuts_at_offset.load(Ordering::SeqCst)
    }

    /// Drops the `nth` `Session.append` call clients send from now on (framed proxies only);
    /// the calls after it pass.
    pub fn drop_append_call(&self, nth: u64) {
        assert!(self.state.framed, "only a framed proxy sees calls");
        self.state.drop_append_in.store(nth, Ordering::SeqCst);
    }

    /// Append calls dropped so far.
    pub fn dropped_calls(&self) -> u64 {
        self.state.dropped_calls.load(Ordering::SeqCst)
    }

    /// Holds back what the clients of every open connection send from now on; new
    /// connections are not held.
    pub fn hold_existing(&self) {
        for hold in self.state.holds.lock().unwrap().drain(..) {
            hold.store(true, Ordering::SeqCst);
            self.state.held.lock().unwrap().push(hold);
        }
    }

    /// Lets the held bytes through, in order.
    pub fn release_held(&self) {
        for hold in self.state.held.lock().unwrap().drain(..) {
            hold.store(false, Ordering::SeqCst);
        }
    }

    /// Chunks still waiting to be forwarded because of a hold.
    pub fn held_chunks(&self) -> u64 {
        self.state.held_chunks.load(Ordering::SeqCst)
    }

    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// A sturdy URI for the same token through this proxy.
    pub fn uri(&self, token: &capsync_schema::Token) -> String {
        capsync_schema::SturdyUri::new(self.addr.clone(), token.clone()).expose()
    }
}

/// Copies `from` to `to` on two threads: a reader that timestamps chunks and a writer that
/// sends each chunk once its delay has passed, so latency is added without limiting throughput.
fn pump(mut from: TcpStream, mut to: TcpStream, state: Arc<State>, is_reply: bool, hold: Arc<AtomicBool>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let reader_state = state.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let framed = reader_state.framed && !is_reply;
        let mut pending = Vec::new();
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if is_reply && reader_state.drop_replies.load(Ordering::SeqCst) {
                        continue;
                    }
                    let chunk = if framed {
                        pending.extend_from_slice(&buf[..n]);
                        let mut forward = Vec::new();
                        while let Some(len) = frame_len(&pending) {
                            let frame: Vec<u8> = pending.drain(..len).collect();
                            if is_append_call(&frame) && reader_state.should_drop_append() {
                                continue;
                            }
                            forward.extend_from_slice(&frame);
                        }
                        forward
                    } else {
                        buf[..n].to_vec()
                    };
                    let due = Instant::now() + Duration::from_millis(reader_state.delay_ms.load(Ordering::SeqCst));
                    if tx.send((due, chunk)).is_err() {
                        break;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        for (due, chunk) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if hold.load(Ordering::SeqCst) {
                state.held_chunks.fetch_add(1, Ordering::SeqCst);
                while hold.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(2));
                }
                state.held_chunks.fetch_sub(1, Ordering::SeqCst);
            }
            if let Some(offset) = state.cut_offset(is_reply, chunk.len()) {
                let _ = to.write_all(&chunk[..offset]);
                let _ = to.flush();
                state.cut_all();
                state.cuts_at_offset.fetch_add(1, Ordering::SeqCst);
                break;
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

impl State {
    fn cut_all(&self) {
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// If the armed cut falls inside the next `len` bytes going this way: how many of them to
    /// forward before cutting (and the next planned cut is armed).
    fn cut_offset(&self, is_reply: bool, len: usize) -> Option<usize> {
        let mut plan = self.cut_plan.lock().unwrap();
        let (replies, remaining) = plan.front_mut()?;
        if *replies != is_reply {
            return None;
        }
        if (len as u64) < *remaining {
            *remaining -= len as u64;
            return None;
        }
        let offset = *remaining as usize;
        plan.pop_front();
        Some(offset)
    }

    fn should_drop_append(&self) -> bool {
        let countdown = self.drop_append_in.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if countdown == Ok(1) {
            self.dropped_calls.fetch_add(1, Ordering::SeqCst);
            return true;
        }
        false
    }
}

/// The length of the Cap'n Proto frame at the start of `bytes`, once all of it is there.
fn frame_len(bytes: &[u8]) -> Option<usize> {
    let word = |i: usize| bytes.get(i * 4..i * 4 + 4).map(|w| u32::from_le_bytes(w.try_into().unwrap()) as usize);
    let segments = word(0)? + 1;
    let header = (4 + 4 * segments).div_ceil(8) * 8;
    let mut body = 0;
    for i in 0..segments {
        body += word(1 + i)? * 8;
    }
    let len = header + body;
    (bytes.len() >= len).then_some(len)
}

fn is_append_call(frame: &[u8]) -> bool {
    use capnp::traits::HasTypeId;
    use capnp_rpc::rpc_capnp::message;
    let mut slice = frame;
    let Ok(msg) = capnp::serialize::read_message_from_flat_slice(&mut slice, capnp::message::ReaderOptions::new()) else {
        return false;
    };
    let Ok(root) = msg.get_root::<message::Reader>() else { return false };
    let Ok(message::Call(Ok(call))) = root.which() else { return false };
    call.get_interface_id() == capsync_schema::capsync_capnp::session::Client::TYPE_ID && call.get_method_id() == 0
}
