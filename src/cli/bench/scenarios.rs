//! The scenarios of `capsync bench` (S1–S8, and S7W: S7 under a write flood), each with its
//! baseline, on SQLite or on PostgreSQL; and, on PostgreSQL only, S10 (S2 on one node vs two).
//! S9 (revocation across two nodes) has a file of its own, `s9.rs`.

use super::harness::{self, ms, median, quantile, BenchServer, DelayProxy};
use super::pg;
use super::{Ctx, Row};
use capsync_client::{Change, Client, Connection, SyncOptions};
use capsync_persistence::EntityKind;
use capsync_schema::capsync_capnp::{listener, session};
use capsync_schema::{Marker, Token};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

fn changes(n: u64, prefix: &str) -> impl Iterator<Item = Change> + '_ {
    (0..n).map(move |i| Change::Put { kind: EntityKind::Message, id: format!("{prefix}{i}"), parent: String::new(), data: harness::payload(i) })
}

/// Enqueues `n` ops and syncs them through a fresh outbox: (ops/s end to end, client, share
/// of the time spent committing them to the outbox).
async fn push(ctx: &Ctx, server: &BenchServer, owner: &Token, n: u64, name: &str) -> anyhow::Result<(f64, Client, f64)> {
    let options = SyncOptions { window: 8, max_batch_ops: 100, ..SyncOptions::default() };
    let client = Client::open(ctx.dir.join(format!("{name}.db")))?.with_options(options);
    client.attach("s", &server.uri(owner))?;
    let started = Instant::now();
    client.enqueue("s", changes(n, name))?;
    let enqueued = started.elapsed();
    client.sync("s").await?;
    let total = started.elapsed();
    Ok((n as f64 / total.as_secs_f64(), client, enqueued.as_secs_f64() / total.as_secs_f64()))
}

/// Appends one put as batch `seq` and waits for its ack.
async fn append_one(session: &session::Client, client: &[u8; 16], seq: u64) -> anyhow::Result<()> {
    let mut request = session.append_request();
    let mut batch = request.get().init_batch();
    batch.set_client_id(client);
    batch.set_batch_seq(seq);
    let mut op = batch.init_ops(1).get(0);
    op.set_op_id(uuid::Uuid::now_v7().as_bytes());
    let mut entity = op.init_put();
    entity.set_kind(capsync_schema::capsync_capnp::EntityKind::Message);
    entity.set_id(format!("m{seq}").as_str());
    entity.set_data(&harness::payload(seq));
    request.send().promise.await?;
    Ok(())
}

pub async fn s1(ctx: &Ctx) -> anyhow::Result<(Value, Vec<Row>, f64)> {
    let n = if ctx.quick { 10_000 } else { 50_000 };
    let server = ctx.server("s1").await?;
    // On PostgreSQL the raw loop runs on a database of its own, a new session each round.
    let raw_pg = match ctx.store("s1-raw").await? {
        Some(url) => Some(pg::Raw::open(&url).await?),
        None => None,
    };
    let (mut ours, mut raw, mut redis, mut enqueue_share) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..ctx.rounds {
        let (_, owner) = server.session().await?;
        let (rate, _, share) = push(ctx, &server, &owner, n, &format!("s1r{round}")).await?;
        ours.push(rate);
        enqueue_share.push(share);
        raw.push(match &raw_pg {
            Some(raw_pg) => raw_pg.append_loop(n, 100).await?,
            None => {
                let raw_dir = ctx.dir.join(format!("s1-raw-{round}"));
                std::fs::create_dir_all(&raw_dir)?;
                harness::raw_sqlite_loop(&raw_dir, n, 100)?
            }
        });
        redis.push(ctx.redis(1, 100, n).map(|r| r.0));
    }
    let ours = median(ours);
    let raw = median(raw);
    let redis = ctx.median_of(redis);
    let (raw_key, raw_name) = if raw_pg.is_some() {
        ("raw_postgres_ops_per_s", "S1 batched push vs raw tokio-postgres loop")
    } else {
        ("raw_sqlite_ops_per_s", "S1 batched push vs raw rusqlite loop")
    };
    let mut figures = json!({"ops": n, "batch_ops": 100, "in_flight": 8, "capsync_ops_per_s": ours, "outbox_commit_share": median(enqueue_share),
        "redis_ops_per_s": redis});
    figures[raw_key] = json!(raw);
    let rows = vec![
        Row::ratio("S1 batched push vs Redis XADD -P 100", ours, redis, "ops/s", ">= 1.0x", 1.0),
        Row::ratio(raw_name, ours, Some(raw), "ops/s", ">= 0.7x", 0.7),
    ];
    Ok((figures, rows, ours))
}

pub async fn s2(ctx: &Ctx) -> anyhow::Result<(Value, Vec<Row>)> {
    let (clients, per_client) = s2_size(ctx);
    let server = ctx.server("s2").await?;
    let (mut ours, mut redis) = (Vec::new(), Vec::new());
    for _ in 0..ctx.rounds {
        ours.push(s2_round(&[&server], clients, per_client).await?);
        redis.push(ctx.redis(clients as u32, 1, clients * per_client).map(|r| r.0));
    }
    let (ours, redis) = (median(ours), ctx.median_of(redis));
    let figures = json!({"clients": clients, "ops_per_client": per_client, "capsync_ops_per_s": ours, "redis_ops_per_s": redis});
    Ok((figures, vec![Row::ratio("S2 32 writers, 1-op batches vs Redis -c 32", ours, redis, "ops/s", ">= 1.0x", 1.0)]))
}

/// S2's writers and ops per writer.
fn s2_size(ctx: &Ctx) -> (u64, u64) {
    (32, if ctx.quick { 100 } else { 300 })
}

/// One round of S2 on a new session: `clients` connections spread over `nodes` in turn (all on
/// one database), each appending `per_client` 1-op batches one at a time. Ops/s.
async fn s2_round(nodes: &[&BenchServer], clients: u64, per_client: u64) -> anyhow::Result<f64> {
    let (_, owner) = nodes[0].session().await?;
    let mut conns = Vec::new();
    for i in 0..clients as usize {
        let conn = Connection::open(&nodes[i % nodes.len()].addr).await?;
        let (session, grant) = conn.session(&owner);
        grant.await?;
        conns.push((conn, session));
    }
    let started = Instant::now();
    let tasks: Vec<_> = conns
        .iter()
        .map(|(_, session)| {
            let session = session.clone();
            tokio::task::spawn_local(async move {
                let client = *uuid::Uuid::new_v4().as_bytes();
                for seq in 1..=per_client {
                    append_one(&session, &client, seq).await?;
                }
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok((clients * per_client) as f64 / started.elapsed().as_secs_f64())
}

pub async fn s3(ctx: &Ctx) -> anyhow::Result<(Value, Vec<Row>)> {
    let n = if ctx.quick { 300 } else { 2000 };
    let server = ctx.server("s3").await?;
    // On PostgreSQL: its own single-row durable insert, alternating with capsync's rounds, and
    // the raw append loop with 1-op batches, on a database of their own.
    let raw_pg = match ctx.store("s3-raw").await? {
        Some(url) => Some(pg::Raw::open(&url).await?),
        None => None,
    };
    let (mut p50s, mut p99s, mut redis) = (Vec::new(), Vec::new(), Vec::new());
    let (mut insert_p50s, mut insert_p99s) = (Vec::new(), Vec::new());
    for _ in 0..ctx.rounds {
        let (_, owner) = server.session().await?;
        let conn = Connection::open(&server.addr).await?;
        let (session, grant) = conn.session(&owner);
        grant.await?;
        let client = *uuid::Uuid::new_v4().as_bytes();
        let mut latencies = Vec::with_capacity(n as usize);
        for seq in 1..=n {
            let started = Instant::now();
            append_one(&session, &client, seq).await?;
            latencies.push(started.elapsed());
        }
        latencies.sort();
        p50s.push(ms(quantile(&latencies, 0.5)));
        p99s.push(ms(quantile(&latencies, 0.99)));
        redis.push(ctx.redis(1, 1, n).map(|r| r.1));
        if let Some(raw_pg) = &raw_pg {
            let (p50, p99) = raw_pg.insert_latency(n).await?;
            insert_p50s.push(p50);
            insert_p99s.push(p99);
        }
    }
    let (p50, p99, redis_p50) = (median(p50s), median(p99s), ctx.median_of(redis));
    if let Some(raw_pg) = &raw_pg {
        // The storage floor: the store's append SQL for one 1-op batch, alone.
        let raw_append = 1000.0 / raw_pg.append_loop(n, 1).await?;
        let (insert_p50, insert_p99) = (median(insert_p50s), median(insert_p99s));
        let figures = json!({
            "ops": n,
            "capsync_p50_ms": p50,
            "capsync_p99_ms": p99,
            "redis_p50_ms": redis_p50,
            "postgres_insert_p50_ms": insert_p50,
            "postgres_insert_p99_ms": insert_p99,
            "raw_postgres_one_op_append_ms": raw_append,
        });
        let mut redis_row = Row::ratio("S3 ack latency p50 vs Redis p50", p50, redis_p50, "ms", "<= 2.0x", 0.0);
        redis_row.met = redis_p50.map(|r| p50 <= 2.0 * r);
        redis_row.measured = format!("p50 {p50:.2} ms, p99 {p99:.2} ms");
        let mut row = Row::ratio("S3 ack p50 vs PostgreSQL 1-row INSERT p50", p50, Some(insert_p50), "ms", "<= 2.0x", 0.0);
        row.met = Some(p50 <= 2.0 * insert_p50);
        row.measured = format!("p50 {p50:.2} ms (raw append {raw_append:.3})");
        row.baseline = format!("{insert_p50:.3} ms");
        return Ok((figures, vec![redis_row, row]));
    }
    let handoff = handoff_round_trip(n).await;
    // The storage floor: the server's own write path for one 1-op batch, alone.
    let raw_dir = ctx.dir.join("s3-raw");
    std::fs::create_dir_all(&raw_dir)?;
    let raw_commit = 1000.0 / harness::raw_sqlite_loop(&raw_dir, n, 1)?;
    let figures = json!({
        "ops": n,
        "capsync_p50_ms": p50,
        "capsync_p99_ms": p99,
        "redis_p50_ms": redis_p50,
        "thread_handoff_round_trip_p50_ms": handoff,
        "raw_one_op_commit_ms": raw_commit,
    });
    let mut row = Row::ratio("S3 ack latency p50 vs Redis p50", p50, redis_p50, "ms", "<= 2.0x", 0.0);
    row.met = redis_p50.map(|r| p50 <= 2.0 * r);
    row.measured = format!("p50 {p50:.2} ms, p99 {p99:.2} ms (raw commit {raw_commit:.3}, handoff {handoff:.3})");
    Ok((figures, vec![row]))
}

/// p50 of a bare round trip from this (RPC-like, current-thread) runtime to a std thread and
/// back, over the channels the server uses between its RPC thread and its writer (std mpsc
/// there, a tokio oneshot back): the part of S3's latency that is only crossing threads.
async fn handoff_round_trip(n: u64) -> f64 {
    let (to_thread, jobs) = std::sync::mpsc::channel::<tokio::sync::oneshot::Sender<()>>();
    let thread = std::thread::spawn(move || {
        for reply in jobs {
            let _ = reply.send(());
        }
    });
    let mut trips = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let (reply, answered) = tokio::sync::oneshot::channel();
        let started = Instant::now();
        let _ = to_thread.send(reply);
        let _ = answered.await;
        trips.push(started.elapsed());
        // Both threads go idle between requests, as in S3 (a bench-only pause; tokio's timer
        // cannot sleep less than a millisecond).
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
    drop(to_thread);
    let _ = thread.join();
    trips.sort();
    ms(quantile(&trips, 0.5))
}

pub async fn s4(ctx: &Ctx, empty_rate: f64) -> anyhow::Result<(Value, Vec<Row>)> {
    let (stored, n, replay_n) = if ctx.quick { (100_000, 10_000, 20_000) } else { (1_000_000, 50_000, 100_000) };
    let data = ctx.dir.join("s4");
    let store = ctx.store("s4").await?;
    let mut server = BenchServer::start(&data, store.as_deref())?;
    let (session_id, owner) = server.session().await?;
    server.stop()?;
    match &store {
        Some(url) => pg::preload(url, &session_id, stored).await?,
        None => harness::preload(&data, &session_id, stored)?,
    }
    let server = BenchServer::start(&data, store.as_deref())?;
    let mut loaded = Vec::new();
    for round in 0..ctx.rounds {
        loaded.push(push(ctx, &server, &owner, n, &format!("s4r{round}")).await?.0);
    }
    let loaded = median(loaded);
    let (_, fresh) = server.session().await?;
    let (first, client, _) = push(ctx, &server, &fresh, replay_n, "s4replay").await?;
    client.forget_acks("s")?;
    let started = Instant::now();
    let report = client.sync("s").await?;
    let replay = replay_n as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(report.duplicates == replay_n, "the replay found {} of {replay_n} ops applied", report.duplicates);
    let figures = json!({"stored_ops": stored, "ops": n, "loaded_ops_per_s": loaded, "empty_ops_per_s": empty_rate,
        "replay_ops": replay_n, "first_write_ops_per_s": first, "replay_ops_per_s": replay});
    Ok((
        figures,
        vec![
            Row::ratio("S4 push onto a 1M-op session vs empty", loaded, Some(empty_rate), "ops/s", ">= 0.7x", 0.7),
            Row::ratio("S4 replay of acked outbox vs first write", replay, Some(first), "ops/s", ">= 2.0x", 2.0),
        ],
    ))
}

pub async fn s5(ctx: &Ctx) -> anyhow::Result<(Value, Vec<Row>)> {
    let n = if ctx.quick { 300 } else { 1000 };
    let server = ctx.server("s5").await?;
    let (_, owner) = server.session().await?;
    let before = server.rss_kib();
    let mut held = Vec::new();
    for _ in 0..n {
        let conn = Connection::open(&server.addr).await?;
        let (session, grant) = conn.session(&owner);
        grant.await?;
        held.push((conn, session));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = server.rss_kib();
    let mib = after as f64 / 1024.0;
    let figures = json!({"connections": n, "rss_before_kib": before, "rss_after_kib": after});
    let mut row = Row::ratio(&format!("S5 {n} idle connections: server RSS"), mib, None, "MiB", "<= 100 MiB", 0.0);
    row.met = Some(mib <= 100.0);
    Ok((figures, vec![row]))
}

struct Stamp {
    sent: Rc<RefCell<Vec<Option<Instant>>>>,
    latencies: Rc<RefCell<Vec<Duration>>>,
}

impl listener::Server for Stamp {
    async fn on_ops(self: Rc<Self>, params: listener::OnOpsParams) -> Result<(), capnp::Error> {
        let now = Instant::now();
        let sent = self.sent.borrow();
        let mut latencies = self.latencies.borrow_mut();
        for op in params.get()?.get_ops()?.iter() {
            if let Some(Some(at)) = sent.get(op.get_seq() as usize) {
                latencies.push(now - *at);
            }
        }
        Ok(())
    }
}

pub async fn s6(ctx: &Ctx) -> anyhow::Result<(Value, Vec<Row>)> {
    let server = ctx.server("s6").await?;
    let (_, owner) = server.session().await?;
    let (subscribers, ops) = (100usize, if ctx.quick { 300 } else { 2000 });
    let sent = Rc::new(RefCell::new(vec![None; ops + 1]));
    let latencies = Rc::new(RefCell::new(Vec::with_capacity(subscribers * ops)));
    let mut conns = Vec::new();
    let mut subs = Vec::new();
    for i in 0..subscribers {
        if i % 10 == 0 {
            conns.push(Connection::open(&server.addr).await?);
        }
        let (session, _) = conns.last().expect("opened above").session(&owner);
        let stamp: listener::Client = capnp_rpc::new_client(Stamp { sent: sent.clone(), latencies: latencies.clone() });
        let mut request = session.subscribe_request();
        request.get().set_after(0);
        request.get().set_listener(stamp);
        subs.push(request.send().promise.await?);
    }
    let writer = Connection::open(&server.addr).await?;
    let (session, _) = writer.session(&owner);
    let client = *uuid::Uuid::new_v4().as_bytes();
    for seq in 1..=ops {
        sent.borrow_mut()[seq] = Some(Instant::now());
        append_one(&session, &client, seq as u64).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while latencies.borrow().len() < subscribers * ops {
        anyhow::ensure!(Instant::now() < deadline, "s6: not every subscriber received every op");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut all = latencies.borrow().clone();
    all.sort();
    let (p50, p99) = (ms(quantile(&all, 0.5)), ms(quantile(&all, 0.99)));
    let figures = json!({"subscribers": subscribers, "ops": ops, "deliveries": all.len(), "p50_ms": p50, "p99_ms": p99});
    let mut row = Row::ratio("S6 fan-out to 100 subscribers", p99, None, "ms", "p99 <= 5 ms", 0.0);
    row.measured = format!("p50 {p50:.2} ms, p99 {p99:.2} ms");
    row.met = Some(p99 <= 5.0);
    drop(subs);
    Ok((figures, vec![row]))
}

pub async fn s7(ctx: &Ctx) -> anyhow::Result<(Value, Vec<Row>)> {
    let server = ctx.server("s7").await?;
    let (_, owner) = server.session().await?;
    let setup = Connection::open(&server.addr).await?;
    let (session, _) = setup.session(&owner);
    let share = mint(&session, "share").await?;
    let (parent, _) = setup.session(&share.0);
    // Ten shares below the one revoked; each redeemed on 100 connections: 1,000 live caps.
    let mut children = Vec::new();
    for i in 0..10 {
        children.push(mint(&parent, &format!("child{i}")).await?.0);
    }
    let mut conns = Vec::new();
    let mut caps = Vec::new();
    for _ in 0..100 {
        let conn = Connection::open(&server.addr).await?;
        for child in &children {
            let (cap, grant) = conn.session(child);
            grant.await?;
            caps.push(cap);
        }
        conns.push(conn);
    }
    let (admin, _) = setup.admin(&server.admin.token);
    let started = Instant::now();
    let mut request = admin.revoke_share_request();
    request.get().set_share_id(share.1.as_str());
    request.send().promise.await?;
    let revoked_in = started.elapsed();
    let calls: Vec<_> = caps.iter().map(|cap| cap.info_request().send().promise).collect();
    let results = futures::future::join_all(calls).await;
    let elapsed = started.elapsed();
    let is_revoked = |r: &Result<_, capnp::Error>| matches!(r, Err(e) if capsync_schema::marker::of_error(e) == Some(Marker::Revoked));
    let revoked = results.iter().filter(|r| is_revoked(r)).count();
    anyhow::ensure!(revoked == caps.len(), "s7: {revoked} of {} capabilities failed with capsync/revoked", caps.len());
    // The floor of this measurement: the same 1,000 calls again, every one already failing.
    // What the first probe takes beyond it is what revocation itself costs the callers.
    let probed = Instant::now();
    let again = futures::future::join_all(caps.iter().map(|cap| cap.info_request().send().promise)).await;
    let probe_floor = probed.elapsed();
    anyhow::ensure!(again.iter().all(is_revoked), "s7: a revoked capability answered");
    let figures = json!({
        "capabilities": caps.len(),
        "connections": conns.len(),
        "revoke_call_ms": ms(revoked_in),
        "revoke_to_last_failure_ms": ms(elapsed),
        "probe_floor_ms": ms(probe_floor),
    });
    let mut row = Row::ratio("S7 revoke: 1,000 live caps on 100 conns vs call + same probe again", ms(elapsed), Some(ms(revoked_in + probe_floor)), "ms", "<= 10 ms", 0.0);
    row.met = Some(ms(elapsed) <= 10.0);
    Ok((figures, vec![row]))
}

/// Sends batch `seq` of `n` puts and waits for its ack.
async fn append_many(session: &session::Client, client: &[u8; 16], seq: u64, n: u32) -> anyhow::Result<()> {
    let mut request = session.append_request();
    let mut batch = request.get().init_batch();
    batch.set_client_id(client);
    batch.set_batch_seq(seq);
    let mut ops = batch.init_ops(n);
    for i in 0..n {
        let mut op = ops.reborrow().get(i);
        op.set_op_id(uuid::Uuid::now_v7().as_bytes());
        let mut entity = op.init_put();
        entity.set_kind(capsync_schema::capsync_capnp::EntityKind::Message);
        entity.set_id(format!("m{seq}-{i}").as_str());
        entity.set_data(&harness::payload(seq));
    }
    request.send().promise.await?;
    Ok(())
}

/// S7 while 16 connections keep the writer's queue full (8 batches of 200 ops in flight each):
/// a revocation is taken ahead of every queued append, so its call should cost about one
/// group commit, not the whole queue. Reported against the latency of an append in that load.
pub async fn s7w(ctx: &Ctx) -> anyhow::Result<(Value, Vec<Row>)> {
    let server = ctx.server("s7w").await?;
    let (_, owner) = server.session().await?;
    let setup = Connection::open(&server.addr).await?;
    let (session, _) = setup.session(&owner);
    let share = mint(&session, "share").await?;
    let (parent, _) = setup.session(&share.0);
    let mut caps = Vec::new();
    let mut conns = Vec::new();
    for i in 0..10 {
        let child = mint(&parent, &format!("child{i}")).await?.0;
        let conn = Connection::open(&server.addr).await?;
        for _ in 0..10 {
            let (cap, grant) = conn.session(&child);
            grant.await?;
            caps.push(cap);
        }
        conns.push(conn);
    }
    let stop = Rc::new(std::cell::Cell::new(false));
    let latencies = Rc::new(RefCell::new(Vec::new()));
    let mut writers = Vec::new();
    for _ in 0..16 {
        let (_, token) = server.session().await?;
        let conn = Connection::open(&server.addr).await?;
        let (stop, latencies) = (stop.clone(), latencies.clone());
        writers.push(tokio::task::spawn_local(async move {
            let (cap, _) = conn.session(&token);
            let client = *uuid::Uuid::new_v4().as_bytes();
            let mut seq = 0;
            while !stop.get() {
                let started = Instant::now();
                let round: Vec<_> = (1..=8).map(|i| append_many(&cap, &client, seq + i, 200)).collect();
                seq += 8;
                for result in futures::future::join_all(round).await {
                    result?;
                }
                latencies.borrow_mut().push(started.elapsed());
            }
            anyhow::Ok(())
        }));
    }
    // Let the flood fill the queue before the revocation.
    tokio::time::sleep(Duration::from_millis(if ctx.quick { 300 } else { 1000 })).await;
    let (admin, _) = setup.admin(&server.admin.token);
    let started = Instant::now();
    let mut request = admin.revoke_share_request();
    request.get().set_share_id(share.1.as_str());
    request.send().promise.await?;
    let revoked_in = started.elapsed();
    let results = futures::future::join_all(caps.iter().map(|cap| cap.info_request().send().promise)).await;
    let elapsed = started.elapsed();
    stop.set(true);
    for writer in writers {
        writer.await??;
    }
    let is_revoked = |r: &Result<_, capnp::Error>| matches!(r, Err(e) if capsync_schema::marker::of_error(e) == Some(Marker::Revoked));
    anyhow::ensure!(results.iter().all(is_revoked), "s7w: a revoked capability answered");
    let mut rounds = latencies.borrow().clone();
    rounds.sort();
    let append_p50 = ms(quantile(&rounds, 0.5));
    let figures = json!({
        "capabilities": caps.len(),
        "writers": 16, "batches_in_flight_per_writer": 8, "ops_per_batch": 200,
        "revoke_call_ms": ms(revoked_in),
        "revoke_to_last_failure_ms": ms(elapsed),
        "append_round_p50_ms": append_p50,
    });
    let row = Row::ratio("S7W revoke call under a write flood vs one append round in it", ms(revoked_in), Some(append_p50), "ms", "< 1.0x", 0.0);
    Ok((figures, vec![row]))
}

pub(super) async fn mint(session: &session::Client, label: &str) -> anyhow::Result<(Token, String)> {
    let mut request = session.mint_request();
    let mut rights = request.get().init_rights();
    rights.set_read(true);
    rights.set_mint(true);
    request.get().set_label(label);
    let response = request.send().promise.await?;
    let results = response.get()?;
    Ok((Token::parse(results.get_token()?.to_str()?)?, results.get_share_id()?.to_string()?))
}

pub async fn s8(ctx: &Ctx) -> anyhow::Result<(Value, Vec<Row>)> {
    let server = ctx.server("s8").await?;
    let proxy = DelayProxy::start(&server.addr)?;
    let one_way = 20;
    let mut trips = Vec::new();
    for round in 0..ctx.rounds {
        let (_, owner) = server.session().await?;
        let options = SyncOptions { max_batch_ops: 10, max_attempts: 1, window: 16, ..SyncOptions::default() };
        let client = Client::open(ctx.dir.join(format!("s8r{round}.db")))?.with_options(options);
        client.attach("s", &capsync_schema::SturdyUri::new(proxy.addr.clone(), owner.clone()).expose())?;
        client.enqueue("s", changes(100, "s8"))?;
        proxy.set_delay(0);
        proxy.refuse(true);
        anyhow::ensure!(client.sync("s").await.is_err(), "s8: the first sync was meant to fail");
        proxy.refuse(false);
        proxy.set_delay(one_way);
        let started = Instant::now();
        let report = client.sync("s").await?;
        anyhow::ensure!(report.batches == 10, "s8: replayed {} batches", report.batches);
        trips.push(started.elapsed().as_secs_f64() / (2.0 * one_way as f64 / 1000.0));
    }
    let trips = median(trips);
    let figures = json!({"one_way_delay_ms": one_way, "batches": 10, "round_trips": trips});
    let mut row = Row::ratio("S8 reconnect + replay 10 batches", trips, None, "RTT", "<= 1.5 RTT", 0.0);
    row.met = Some(trips <= 1.5);
    Ok((figures, vec![row]))
}

/// S10: S2 (32 writers on one session, 1-op batches) against one node, and against two nodes
/// on one database with the writers spread over both; alternating rounds, each setup on a
/// fresh database of its own.
pub async fn s10(ctx: &Ctx) -> anyhow::Result<(Value, Vec<Row>)> {
    use anyhow::Context as _;
    let (clients, per_client) = s2_size(ctx);
    let url_one = ctx.store("s10-1").await?.context("S10 needs PostgreSQL")?;
    let one = BenchServer::start(&ctx.dir.join("s10-1"), Some(&url_one))?;
    let url_two = ctx.store("s10-2").await?.context("S10 needs PostgreSQL")?;
    let a = BenchServer::start(&ctx.dir.join("s10-2a"), Some(&url_two))?;
    let b = BenchServer::start(&ctx.dir.join("s10-2b"), Some(&url_two))?;
    let (mut singles, mut doubles) = (Vec::new(), Vec::new());
    for _ in 0..ctx.rounds {
        singles.push(s2_round(&[&one], clients, per_client).await?);
        doubles.push(s2_round(&[&a, &b], clients, per_client).await?);
    }
    let (single, double) = (median(singles), median(doubles));
    let figures = json!({"clients": clients, "ops_per_client": per_client, "one_node_ops_per_s": single, "two_nodes_ops_per_s": double});
    let row = Row::ratio("S10 S2 on 2 nodes vs 1 node, one PostgreSQL", double, Some(single), "ops/s", "reported", 0.0);
    Ok((figures, vec![row]))
}
