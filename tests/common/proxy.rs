//! A TCP proxy on 127.0.0.1 for fault tests: it can delay each direction, drop the server's
//! replies, refuse connections, cut every connection, and counts the connections it accepts.

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
}

pub struct Proxy {
    pub addr: String,
    state: Arc<State>,
}

impl Proxy {
    pub fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(State::default());
        let shared = state.clone();
        let upstream = upstream.to_owned();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                if shared.refuse.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else { continue };
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
        for stream in self.state.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
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
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if is_reply && reader_state.drop_replies.load(Ordering::SeqCst) {
                        continue;
                    }
                    let due = Instant::now() + Duration::from_millis(reader_state.delay_ms.load(Ordering::SeqCst));
                    if tx.send((due, buf[..n].to_vec())).is_err() {
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
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
