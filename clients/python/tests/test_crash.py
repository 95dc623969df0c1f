"""A server killed with SIGKILL in the middle of a sync: nothing lost, nothing doubled."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import List

import capnp
import pytest

import capsync
from capsync import BatchAck, CapsyncError, Client, Put, SturdyUri, SyncOptions

from conftest import Server, cli_pull_json

MESSAGES = 1500
PARTS = 500


async def read_op_log(uri: SturdyUri) -> List[tuple]:
    """The session's whole op log through raw ``changes`` calls: ``(seq, opId, kind, id)``."""
    schema = capsync.load_schema()
    log: List[tuple] = []
    async with capsync.kj_loop():
        stream = await capnp.AsyncIoStream.create_connection(host=uri.host, port=uri.port)
        rpc = capnp.TwoPartyClient(stream)
        try:
            session = rpc.bootstrap().cast_as(schema.Gateway).redeem(token=uri.token.expose()).session
            while True:
                page = await session.changes(after=log[-1][0] if log else 0, limit=1000)
                if len(page.ops) == 0:
                    return log
                for a in page.ops:
                    body = a.op.put if a.op.which() == "put" else a.op.delete
                    log.append((a.seq, bytes(a.op.opId), str(body.kind), body.id))
        finally:
            rpc.close()
            stream.close()


async def test_sigkill_mid_sync_loses_and_doubles_nothing(own_server: Server, tmp_path: Path) -> None:
    owner, _ = own_server.create_session("crash")
    killed_after: List[int] = []
    acks: List[BatchAck] = []

    def on_ack(ack: BatchAck) -> None:
        acks.append(ack)
        if len(acks) == 12 and not killed_after:
            killed_after.append(ack.batch_seq)
            own_server.kill()

    options = SyncOptions(max_batch_ops=10, window=16, max_attempts=1, on_ack=on_ack)
    client = Client.open(tmp_path / "outbox.db", options)
    client.attach("w", owner)
    changes = [Put("message", f"m{i:04}", {"i": i}) for i in range(MESSAGES)]
    changes += [Put("part", f"p{i:04}", {"text": f"part {i}"}, parent=f"m{i:04}") for i in range(PARTS)]
    op_ids = client.enqueue("w", changes)
    total = len(op_ids)

    with pytest.raises(CapsyncError) as crashed:
        await asyncio.wait_for(client.sync("w"), 60)
    assert crashed.value.retryable, f"a crashed server gave a non-retryable {crashed.value.kind} error"
    assert killed_after, "the server was not killed during the sync"
    status = client.status()[0]
    assert status.state == "unreachable"
    acked_before = sum(len(a.results) for a in acks)
    assert status.acked == acked_before, "every ack received before the crash is recorded"
    assert status.sent > 0, "batches were in flight when the server died"
    assert status.pending + status.sent + status.acked == total

    # Restart on the same data dir (a new port: the ref is re-attached at the new address).
    own_server.start()
    client.attach("w", own_server.at_current_address(owner))
    client.options.on_ack = None
    client.options.max_attempts = 5
    report = await asyncio.wait_for(client.sync("w"), 60)
    print(f"acked before the crash: {acked_before}; replay: {report}")
    assert report.applied + report.duplicate == total - acked_before
    assert report.conflict == report.rejected == 0
    status = client.status()[0]
    assert (status.state, status.acked, status.pending, status.sent) == ("ok", total, 0, 0)

    # Each opId was applied exactly once: its seqs (duplicates answer the first seq) are 1..total.
    seqs = sorted(ack_seq for _, _, _, ack_seq in client.outbox.ops("w"))
    assert seqs == list(range(1, total + 1))

    # The server's op log holds each op once, with no gap.
    log = await asyncio.wait_for(read_op_log(own_server.at_current_address(owner)), 60)
    assert [seq for seq, *_ in log] == list(range(1, total + 1))
    assert len({op_id for _, op_id, _, _ in log}) == total
    assert {op_id for _, op_id, _, _ in log} == set(op_ids)

    # The Rust CLI's view: every entity once, nothing lost.
    pulled = cli_pull_json(own_server.at_current_address(owner), tmp_path / "rust-pull.db")
    keys = [(e["kind"], e["id"]) for e in pulled["entities"]]
    assert len(keys) == len(set(keys)) == total
    assert set(keys) == {(c.kind, c.id) for c in changes}
    assert pulled["cursor"] == total
