"""Pipelining: raw pycapnp ``redeem(token).session.append(batch)`` without awaiting the redeem,
and the client's reconnect-and-replay costing one round trip (the Rust bench's S8)."""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from pathlib import Path

import capnp
import pytest

import capsync
from capsync import CapsyncError, Client, Put, SyncOptions
from capsync.outbox import uuid7

from conftest import DelayProxy, Server

# 100 ms each way: long next to the work a sync does on a busy 2-core machine, so the ratio
# counts round trips, not CPU time (S8 in `capsync bench` uses 20 ms on a quiet machine).
ONE_WAY = 0.100


def build_append(session, client_id: bytes, batch_seq: int, ids) -> object:
    request = session.append_request()
    batch = request.init("batch")
    batch.clientId = client_id
    batch.batchSeq = batch_seq
    ops = batch.init("ops", len(ids))
    for i, eid in enumerate(ids):
        ops[i].opId = uuid7()
        entity = ops[i].init("put")
        entity.kind = "message"
        entity.id = eid
        entity.data = b'{"role":"user"}'
    return request


@pytest.mark.parametrize("token_kind", ["owner", "share"])
async def test_raw_redeem_session_append_is_pipelined(server: Server, delay_proxy: DelayProxy, token_kind: str) -> None:
    owner, session_id = server.create_session(f"raw {token_kind}")
    uri = owner if token_kind == "owner" else server.share(owner, "read,append", "raw")[0]
    schema = capsync.load_schema()
    delay_proxy.delay = ONE_WAY
    async with capnp.kj_loop():
        stream = await capnp.AsyncIoStream.create_connection(host=delay_proxy.host, port=delay_proxy.port)
        rpc = capnp.TwoPartyClient(stream)
        try:
            gateway = rpc.bootstrap().cast_as(schema.Gateway)
            started = time.perf_counter()
            redeem = gateway.redeem(token=uri.token.expose())
            # `session` is outside the Grant union: C++ can pipeline on it. Nothing is awaited
            # before both calls are sent.
            append = build_append(redeem.session, secrets.token_bytes(16), 1, ["m1", "m2"]).send()
            response = await asyncio.wait_for(append, 10)
            elapsed = time.perf_counter() - started
            ack = response.ack
            assert ack.batchSeq == 1
            assert [str(r.status) for r in ack.results] == ["applied", "applied"]
            assert [r.seq for r in ack.results] == [1, 2]
            grant = (await asyncio.wait_for(redeem, 10)).grant
            assert str(grant.kind) == ("session" if token_kind == "owner" else "share")
            assert grant.sessionId == session_id
            assert grant.rights.append
            # Bootstrap, redeem and append went out together: one round trip, not three.
            assert elapsed / (2 * ONE_WAY) <= 1.5, f"redeem+append took {elapsed / (2 * ONE_WAY):.2f} round trips"
        finally:
            rpc.close()
            stream.close()


async def test_reconnect_and_replay_of_10_batches_costs_one_round_trip(server: Server, delay_proxy: DelayProxy, tmp_path: Path) -> None:
    trips = []
    for round_no in range(3):
        owner, _ = server.create_session(f"s8 {round_no}")
        client = Client.open(tmp_path / f"s8r{round_no}.db", SyncOptions(max_batch_ops=10, max_attempts=1, window=16))
        client.attach("s", owner.with_address(delay_proxy.address))
        client.enqueue("s", [Put("message", f"m{i}", {"i": i}) for i in range(100)])
        delay_proxy.delay = 0.0
        delay_proxy.refuse = True
        with pytest.raises(CapsyncError) as first:
            await asyncio.wait_for(client.sync("s"), 30)
        assert first.value.retryable, f"the refused sync failed with a non-retryable {first.value.kind}"
        status = client.status()[0]
        assert status.acked == 0 and status.pending + status.sent == 100
        assert len(client.outbox.unacked_batches("s")) == 10
        delay_proxy.refuse = False
        delay_proxy.delay = ONE_WAY
        started = time.perf_counter()
        report = await asyncio.wait_for(client.sync("s"), 30)
        elapsed = time.perf_counter() - started
        assert (report.batches, report.applied) == (10, 100)
        assert client.status()[0].acked == 100
        trips.append(elapsed / (2 * ONE_WAY))
        client.close()
    median = statistics.median(trips)
    print(f"reconnect + replay of 10 batches: {median:.2f} RTT (rounds: {', '.join(f'{t:.2f}' for t in trips)})")
    assert median <= 1.5, f"replay took {median:.2f} round trips (rounds {trips})"
