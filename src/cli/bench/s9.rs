//! S9 of `capsync bench`: revocation across two nodes on one PostgreSQL database.

use super::harness::{self, ms, median, quantile, BenchServer};
use super::pg;
use super::scenarios::mint;
use super::{Ctx, Row};
use capsync_client::Connection;
use capsync_schema::capsync_capnp::session;
use capsync_schema::{Marker, Token};
use futures::StreamExt as _;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// S9: cross-node revocation. Two nodes on one database; a share with ten child shares, each
/// child redeemed 100 times on node A (1,000 live capabilities over 10 connections); the share
/// is revoked through node B's admin. Measured from `revokeShare` returning on B until the
/// last of the 1,000 capabilities has failed a call with `capsync/revoked` on A: each
/// capability is probed with `info` and asks again as soon as its own answer comes back
/// without the failure (see [`probe`]). Repeated with a new share each time; p50 and p99 over
/// the repetitions. Beside it: the same probe again once all fail (the probe's own cost, with
/// the CPU it took node A and the bench), and when the revocation's notice reached a LISTEN
/// connection of the bench's own, relative to the call's return.
pub async fn s9(ctx: &Ctx) -> anyhow::Result<(Value, Vec<Row>)> {
    use anyhow::Context as _;
    let url = ctx.store("s9").await?.context("S9 needs PostgreSQL")?;
    let a = BenchServer::start(&ctx.dir.join("s9-a"), Some(&url))?;
    let b = BenchServer::start(&ctx.dir.join("s9-b"), Some(&url))?;
    let repetitions = if ctx.quick { 5 } else { 20 };
    // When the revocation's notice reaches a listener of the bench's own on the same database:
    // what node A's listening connection waits for, without the probe.
    let notices = pg::listen(&url, capsync_store_postgres::notify::REVOKE_CHANNEL)?;
    let setup_b = Connection::open(&b.addr).await?;
    let (admin_b, _) = setup_b.admin(&b.admin.token);
    let (_, owner) = a.session().await?;
    let setup_a = Connection::open(&a.addr).await?;
    let (session, _) = setup_a.session(&owner);
    let mut conns = Vec::new();
    for _ in 0..10 {
        conns.push(Connection::open(&a.addr).await?);
    }
    let (mut calls, mut lasts, mut floors, mut most_asks, mut failed_on_first_ask) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut notice_after_return, mut floor_cpu_a, mut floor_cpu_bench) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..repetitions {
        let share = mint(&session, &format!("s9-{rep}")).await?;
        let (parent, _) = setup_a.session(&share.0);
        let mut children = Vec::new();
        for i in 0..10 {
            children.push(mint(&parent, &format!("s9-{rep}-child{i}")).await?.0);
        }
        let mut caps = Vec::new();
        for conn in &conns {
            caps.push(redeem(conn, &children, 10).await?);
        }
        while notices.try_recv().is_ok() {}
        let started = Instant::now();
        let mut request = admin_b.revoke_share_request();
        request.get().set_share_id(share.1.as_str());
        request.send().promise.await?;
        let returned = Instant::now();
        let asks = probe(&caps, returned).await?;
        let last = returned.elapsed();
        most_asks.push(asks.iter().copied().max().unwrap_or(0));
        failed_on_first_ask.push(asks.iter().filter(|n| **n == 1).count());
        let noticed = loop {
            let (at, payload) =
                notices.recv_timeout(Duration::from_secs(10)).map_err(|_| anyhow::anyhow!("s9: the revocation's notice never came"))?;
            if payload.contains(share.1.as_str()) {
                break at;
            }
        };
        notice_after_return.push(if noticed >= returned { ms(noticed - returned) } else { -ms(returned - noticed) });
        // The floor: the same probe again, every capability already failing. Which side's CPU
        // it costs (node A's, or the bench's own client thread) says what would make it cheaper.
        let (cpu_a, cpu_bench) = (harness::cpu_time(a.pid()), harness::cpu_time(std::process::id()));
        let probed = Instant::now();
        let again = probe(&caps, probed).await?;
        floors.push(probed.elapsed());
        floor_cpu_a.push(ms(harness::cpu_time(a.pid()).saturating_sub(cpu_a)));
        floor_cpu_bench.push(ms(harness::cpu_time(std::process::id()).saturating_sub(cpu_bench)));
        anyhow::ensure!(again.iter().all(|n| *n == 1), "s9: a revoked capability answered");
        calls.push(returned - started);
        lasts.push(last);
    }
    let mut sorted = lasts.clone();
    sorted.sort();
    let floors_in_order: Vec<f64> = floors.iter().map(|d| ms(*d)).collect();
    floors.sort();
    calls.sort();
    let (p50, p99) = (ms(quantile(&sorted, 0.5)), ms(quantile(&sorted, 0.99)));
    let floor = ms(quantile(&floors, 0.5));
    let figures = json!({
        "nodes": 2,
        "capabilities": 1000,
        "connections_on_a": conns.len(),
        "repetitions": repetitions,
        "revoke_return_to_last_failure_ms": lasts.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        "p50_ms": p50,
        "p99_ms": p99,
        "revoke_call_p50_ms": ms(quantile(&calls, 0.5)),
        "probe_floor_ms": floors_in_order,
        "probe_floor_p50_ms": floor,
        "probe_floor_cpu_p50_ms": {"node_a": median(floor_cpu_a), "bench": median(floor_cpu_bench)},
        "most_asks_of_one_cap": most_asks,
        "failed_on_first_ask": failed_on_first_ask,
        "notice_after_return_ms": notice_after_return,
        "notice_after_return_p50_ms": median(notice_after_return.clone()),
    });
    let mut row = Row::ratio("S9 revoke on B: last of 1,000 caps on A fails", p99, Some(floor), "ms", "p99 <= 50 ms", 0.0);
    row.measured = format!("p50 {p50:.1} ms, p99 {p99:.1} ms");
    row.baseline = format!("probe floor {floor:.1} ms");
    row.met = Some(p99 <= 50.0);
    Ok((figures, vec![row]))
}

/// Redeems each token `times` times on `conn` and keeps the capabilities the answers return.
/// Not the pipelined ones (`Connection::session`): capnp-rpc-rust never resolves a pipelined
/// capability to the answer's, so every call on one names the redeem's answer and node A walks
/// that answer to find the capability again, call after call.
async fn redeem(conn: &Connection, tokens: &[Token], times: usize) -> anyhow::Result<Vec<session::Client>> {
    let mut answers = Vec::new();
    for token in tokens {
        for _ in 0..times {
            let mut request = conn.gateway.redeem_request();
            request.get().set_token(token.expose());
            answers.push(request.send().promise);
        }
    }
    let mut caps = Vec::with_capacity(answers.len());
    for answer in futures::future::join_all(answers).await {
        caps.push(answer?.get()?.get_session()?);
    }
    Ok(caps)
}

/// What an `info` call answers, once it does.
type InfoReply = capnp::capability::Promise<capnp::capability::Response<session::info_results::Owned>, capnp::Error>;

/// Calls `info` on every capability (`conns`: those of each connection) until each has failed
/// with `capsync/revoked`; how many calls each took. A capability asks again as soon as its
/// own answer comes back without the failure, so one that answered just before the
/// revocation reached node A costs one more round trip of its own, not a second sweep behind
/// the slowest of the 1,000. The calls leave connection by connection, yielding after each,
/// so the connections' RPC tasks write the first ones while the next are built and node A
/// starts on them at once, not after the bench has built all 1,000.
async fn probe(conns: &[Vec<session::Client>], since: Instant) -> anyhow::Result<Vec<u32>> {
    let mut probes = futures::stream::FuturesUnordered::new();
    for caps in conns {
        for cap in caps {
            // Sent now, not when the probe is first polled.
            let first = cap.info_request().send().promise;
            probes.push(until_revoked(cap, first, since));
        }
        tokio::task::yield_now().await;
    }
    let mut asks = Vec::with_capacity(probes.len());
    while let Some(asked) = probes.next().await {
        asks.push(asked?);
    }
    Ok(asks)
}

async fn until_revoked(cap: &session::Client, mut reply: InfoReply, since: Instant) -> anyhow::Result<u32> {
    let mut asked = 1;
    loop {
        match reply.await {
            Ok(_) => {
                anyhow::ensure!(since.elapsed() < Duration::from_secs(30), "s9: a capability on A still answers 30 s after the revocation");
                asked += 1;
                reply = cap.info_request().send().promise;
            }
            Err(e) if capsync_schema::marker::of_error(&e) == Some(Marker::Revoked) => return Ok(asked),
            Err(e) => anyhow::bail!("s9: a probe failed with something else than capsync/revoked: {e}"),
        }
    }
}
