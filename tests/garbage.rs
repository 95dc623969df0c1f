//! Issue 7: garbage on the wire. Many connections send random bytes, truncated frames, absurd
//! segment counts and sizes, or nothing at all, while a real client pushes; the server stays
//! up, its memory stays bounded, and every one of the real client's ops lands exactly once.

mod common;

use capsync_client::Connection;
use common::*;
use rand::{Rng as _, SeedableRng as _};
use std::io::Write as _;
use std::process::Command;
use std::time::Duration;

/// One hostile connection of kind `kind`.
fn attack(addr: &str, kind: u32, rng: &mut rand::rngs::StdRng) -> Option<std::net::TcpStream> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    let frame_header = |count_minus_one: u32, first_words: u32| {
        let mut h = count_minus_one.to_le_bytes().to_vec();
        h.extend_from_slice(&first_words.to_le_bytes());
        h
    };
    let bytes: Vec<u8> = match kind {
        // Random bytes.
        0 => (0..rng.random_range(1..65_536)).map(|_| rng.random()).collect(),
        // A frame that promises 4096 words and delivers 100 bytes, then stalls.
        1 => {
            let mut b = frame_header(0, 4096);
            b.extend((0..100).map(|_| rng.random::<u8>()));
            b
        }
        // Absurd segment counts.
        2 => frame_header(u32::MAX, 1),
        3 => frame_header(511, 1),
        // An absurd segment size.
        4 => frame_header(0, u32::MAX),
        // A size just under the limit, never sent.
        5 => frame_header(0, 2 * 1024 * 1024 - 1),
        // A well-formed frame of garbage words.
        6 => {
            let mut b = frame_header(0, 64);
            b.extend((0..512).map(|_| rng.random::<u8>()));
            b
        }
        // Half-open: connect, send nothing.
        _ => Vec::new(),
    };
    let _ = stream.write_all(&bytes);
    Some(stream)
}

on_both_stores! {
    #[test]
    fn garbage_connections_do_not_hurt_the_server_or_a_real_client() {
        let seed: u64 = std::env::var("CAPSYNC_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
        println!("seed {seed}");
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start_with_args(&dir.path().join("data"), &["--frame-timeout", "2s"]);
        let admin = server.admin_uri();
        let owner = run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            create_session(&conn, &admin.token, "garbage").await.1
        });
        let rss_before = rss_kib(server.pid());

        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let attackers: Vec<_> = (0..4)
            .map(|t| {
                let (addr, stop) = (server.addr.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ t);
                    let mut open = Vec::new();
                    let mut made = 0u32;
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) && made < 400 {
                        if let Some(s) = attack(&addr, rng.random_range(0..8), &mut rng) {
                            open.push(s);
                        }
                        made += 1;
                        if open.len() > 50 {
                            open.drain(..25);
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    made
                })
            })
            .collect();

        let ops = dir.path().join("ops.jsonl");
        let mut lines = String::new();
        for i in 0..20_000 {
            lines.push_str(&format!("{{\"op\":\"put\",\"kind\":\"message\",\"id\":\"g{i}\",\"data\":{{\"i\":{i}}}}}\n"));
        }
        std::fs::write(&ops, lines).unwrap();
        let uri = capsync_schema::SturdyUri::new(server.addr.clone(), owner.clone()).expose();
        let out = Command::new(BIN).args(["push", &uri, "--file", ops.to_str().unwrap(), "--outbox"]).arg(dir.path().join("o.db")).output().unwrap();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let attacks: u32 = attackers.into_iter().map(|a| a.join().unwrap()).sum();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

        let rss_after = rss_kib(server.pid());
        let growth = rss_after.saturating_sub(rss_before) as f64 / 1024.0;
        println!("{attacks} hostile connections; server RSS {rss_before} -> {rss_after} KiB (+{growth:.1} MiB)");
        assert!(growth < 128.0, "server memory grew {growth:.1} MiB");
        let (cursor_now, ids) = run_local(async {
            let conn = Connection::open(&server.addr).await.unwrap();
            let (session, _) = conn.session(&owner);
            let (at, entities) = snapshot(&session, 0).await.unwrap();
            (at, entities.len())
        });
        assert_eq!((cursor_now, ids), (20_000, 20_000), "every op landed exactly once");
        assert!(std::fs::read_to_string(format!("/proc/{}/status", server.pid())).is_ok(), "the server is still running");
    }
}
