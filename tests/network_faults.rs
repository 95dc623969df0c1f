//! Issue 5 network scenarios, made by a proxy between a real client and a real server: one
//! append request dropped while the ones after it arrive, and connections cut at random byte
//! offsets (inside frames, in either direction). Each is judged by the history checker.

mod common;

use capsync_client::{Client, SyncOptions};
use common::checker;
use common::proxy::Proxy;
use common::*;
use rand::{Rng as _, SeedableRng as _};
use std::time::Duration;

fn patient_options() -> SyncOptions {
    SyncOptions {
        ack_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(2),
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(100),
        max_attempts: 10,
        ..SyncOptions::default()
    }
}

on_both_stores! {
    /// The proxy swallows the 3rd append call and passes the 13 pipelined behind it. The server
    /// must not apply them ahead of the missing one; the client, getting no ack for it, replays
    /// from it on a new connection.
    #[test]
    fn a_request_dropped_while_the_next_ones_arrive_is_not_overtaken() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let (_, owner) = new_session(&server);
        let proxy = Proxy::start_framed(&server.addr);
        let options = SyncOptions { max_batch_ops: 100, window: 16, ..patient_options() };
        let outbox = dir.path().join("c.db");
        let client = Client::open(&outbox).unwrap().with_options(options);
        client.attach("s", &proxy.uri(&owner)).unwrap();
        client.enqueue("s", messages(0..3000, "m")).unwrap();
        proxy.drop_append_call(3);
        let report = run_local(async { client.sync("s").await }).unwrap();
        assert_eq!(proxy.dropped_calls(), 1, "one append call was dropped");
        assert!(proxy.accepted() >= 2, "the client gave up on the first connection and replayed on another");
        let verdict = checker::check(&[checker::history(&outbox)], &server_log(&server.addr, &owner), true)
            .unwrap_or_else(|violation| panic!("{violation}"));
        println!(
            "dropped request: {} connections, {} batches acked in the end, {} ops answered duplicate; {} logged in order",
            proxy.accepted(),
            report.batches,
            report.duplicates,
            verdict.logged
        );
        assert_eq!(verdict.logged, 3000);
    }

    /// Cuts land at seeded random byte offsets: inside the handshake, the redeem, a batch's frame
    /// on its way to the server, or an ack on its way back. One sync rides through all of them,
    /// reconnecting and replaying after each. `CAPSYNC_CUT_SEED` reproduces the offsets.
    #[test]
    fn connections_cut_at_random_byte_offsets_lose_and_double_nothing() {
        let seed = std::env::var("CAPSYNC_CUT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
        println!("cut seed {seed}: CAPSYNC_CUT_SEED={seed} reproduces the offsets");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let plan: Vec<(bool, u64)> = (0..25)
            .map(|_| {
                let replies = rng.random_bool(0.3);
                let offset = match (replies, rng.random_bool(0.2)) {
                    (false, true) => rng.random_range(1..400),
                    (false, false) => rng.random_range(400..120_000),
                    (true, true) => rng.random_range(1..200),
                    (true, false) => rng.random_range(200..12_000),
                };
                (replies, offset)
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(&dir.path().join("data"));
        let (_, owner) = new_session(&server);
        let proxy = Proxy::start(&server.addr);
        let options = SyncOptions { max_batch_ops: 40, window: 8, max_attempts: 30, ..patient_options() };
        let outbox = dir.path().join("c.db");
        let client = Client::open(&outbox).unwrap().with_options(options);
        client.attach("s", &proxy.uri(&owner)).unwrap();
        client.enqueue("s", messages(0..30_000, "m")).unwrap();
        proxy.plan_cuts(plan.clone());
        let report = run_local(async { client.sync("s").await }).unwrap_or_else(|err| panic!("seed {seed}: {err} ({err:?})"));
        assert_eq!(proxy.cuts_pending(), 0, "every planned cut landed before the queue ran out");
        let verdict = checker::check(&[checker::history(&outbox)], &server_log(&server.addr, &owner), true)
            .unwrap_or_else(|violation| panic!("seed {seed}: {violation}"));
        println!(
            "{} cuts at (reply?, offset) {plan:?}: {} connections, {} ops answered duplicate on replay; {} logged",
            proxy.cuts_at_offset(),
            proxy.accepted(),
            report.duplicates,
            verdict.logged
        );
        assert_eq!(proxy.cuts_at_offset(), 25);
        assert_eq!(verdict.logged, 30_000);
    }
}
