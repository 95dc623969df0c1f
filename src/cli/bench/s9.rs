//! S9 of `capsync bench`: revocation across two nodes on one PostgreSQL database.

use super::harness::{ms, median, quantile, BenchServer};
use super::pg;
use super::scenarios::mint;
use super::{Ctx, Row};
use capsync_client::Connection;
use capsync_schema::capsync_capnp::session;
use capsync_schema::Marker;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// S9: cross-node revocation. Two nodes on one database; a share with ten child shares, each
/// child redeemed 100 times on node A (1,000 live capabilities over 10 connections); the share
/// is revoked through node B's admin. Measured from `revokeShare` returning on B until the
/// last of the 1,000 capabilities has failed a call with `capsync/revoked` on A: every
/// capability not yet failing is probed again (one `info` call each, all at once) until none
/// answers. Repeated with a new share each time; p50 and p99 over the repetitions. Beside it:
/// the same 1,000 calls again once all fail (the probe's own cost), and when the revocation's
/// notice reached a LISTEN connection of the bench's own, relative to the call's return.
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
    let is_revoked = |r: &Result<_, capnp::Error>| matches!(r, Err(e) if capsync_schema::marker::of_error(e) == Some(Marker::Revoked));
    let (mut calls, mut lasts, mut floors, mut sweeps, mut first_sweep_revoked) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut notice_after_return = Vec::new();
    for rep in 0..repetitions {
        let share = mint(&session, &format!("s9-{rep}")).await?;
        let (parent, _) = setup_a.session(&share.0);
        let mut children = Vec::new();
        for i in 0..10 {
            children.push(mint(&parent, &format!("s9-{rep}-child{i}")).await?.0);
        }
        let mut caps = Vec::new();
        for conn in &conns {
            let mut grants = Vec::new();
            for child in &children {
                for _ in 0..10 {
                    let (cap, grant) = conn.session(child);
                    caps.push(cap);
                    grants.push(grant);
                }
            }
            for grant in futures::future::join_all(grants).await {
                grant?;
            }
        }
        while notices.try_recv().is_ok() {}
        let started = Instant::now();
        let mut request = admin_b.revoke_share_request();
        request.get().set_share_id(share.1.as_str());
        request.send().promise.await?;
        let returned = Instant::now();
        let mut pending: Vec<&session::Client> = caps.iter().collect();
        let mut rounds = 0;
        while !pending.is_empty() {
            anyhow::ensure!(returned.elapsed() < Duration::from_secs(30), "s9: {} capabilities on A still answer 30 s after the revocation", pending.len());
            rounds += 1;
            let results = futures::future::join_all(pending.iter().map(|cap| cap.info_request().send().promise)).await;
            let before = pending.len();
            let mut still = Vec::new();
            for (cap, result) in pending.into_iter().zip(results) {
                match result {
                    Ok(_) => still.push(cap),
                    Err(e) if capsync_schema::marker::of_error(&e) == Some(Marker::Revoked) => {}
                    Err(e) => anyhow::bail!("s9: a probe failed with something else than capsync/revoked: {e}"),
                }
            }
            if rounds == 1 {
                first_sweep_revoked.push(before - still.len());
            }
            pending = still;
        }
        let last = returned.elapsed();
        let noticed = loop {
            let (at, payload) =
                notices.recv_timeout(Duration::from_secs(10)).map_err(|_| anyhow::anyhow!("s9: the revocation's notice never came"))?;
            if payload.contains(share.1.as_str()) {
                break at;
            }
        };
        notice_after_return.push(if noticed >= returned { ms(noticed - returned) } else { -ms(returned - noticed) });
        // The floor: the same 1,000 calls again, every one already failing.
        let probed = Instant::now();
        let again = futures::future::join_all(caps.iter().map(|cap| cap.info_request().send().promise)).await;
        floors.push(probed.elapsed());
        anyhow::ensure!(again.iter().all(is_revoked), "s9: a revoked capability answered");
        calls.push(returned - started);
        lasts.push(last);
        sweeps.push(rounds);
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
        "probe_sweeps": sweeps,
        "notice_after_return_ms": notice_after_return,
        "notice_after_return_p50_ms": median(notice_after_return.clone()),
        "revoked_in_first_sweep": first_sweep_revoked,
    });
    let mut row = Row::ratio("S9 revoke on B: last of 1,000 caps on A fails", p99, Some(floor), "ms", "p99 <= 50 ms", 0.0);
    row.measured = format!("p50 {p50:.1} ms, p99 {p99:.1} ms");
    row.baseline = format!("probe floor {floor:.1} ms");
    row.met = Some(p99 <= 50.0);
    Ok((figures, vec![row]))
}
