"""Concurrent writers: the Rust client (``capsync push``) and the Python client writing to one
session at once; two refs of one session in one outbox; concurrent syncs of one ref."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import List

from capsync import BatchAck, Client, Put, SyncOptions

from conftest import Server, cli_pull_json, cli_push, message_ops, write_jsonl

RUST_OPS = 2000
MIN_PY_ROUNDS, MAX_PY_ROUNDS, PY_PER_ROUND = 20, 400, 10


async def test_rust_and_python_write_one_session_concurrently(server: Server, tmp_path: Path) -> None:
    owner, _ = server.create_session("two writers")
    ops_file = write_jsonl(tmp_path / "rust.jsonl", message_ops("rs-", RUST_OPS))
    client = Client.open(tmp_path / "py.db", SyncOptions(max_batch_ops=PY_PER_ROUND))
    client.attach("w", owner)

    rust = await cli_push(owner, ops_file, tmp_path / "rust.db")
    rounds = python_acked = synced_while_rust_ran = 0
    # Python keeps writing (one sync per round) for as long as the Rust push runs.
    while rounds < MAX_PY_ROUNDS and (rounds < MIN_PY_ROUNDS or rust.returncode is None):
        client.enqueue("w", [Put("message", f"py-{rounds * PY_PER_ROUND + i}", {"r": rounds}) for i in range(PY_PER_ROUND)])
        report = await asyncio.wait_for(client.sync("w"), 30)
        python_acked += report.applied
        synced_while_rust_ran += rust.returncode is None
        rounds += 1
    _, stderr = await asyncio.wait_for(rust.communicate(), 60)
    assert rust.returncode == 0, "capsync push failed"
    assert synced_while_rust_ran > 0, "no Python sync overlapped the Rust push"
    assert python_acked == rounds * PY_PER_ROUND

    pulled = cli_pull_json(owner, tmp_path / "pull.db")
    ids = [e["id"] for e in pulled["entities"]]
    assert len(ids) == len(set(ids))
    expected = {f"rs-{i}" for i in range(RUST_OPS)} | {f"py-{i}" for i in range(rounds * PY_PER_ROUND)}
    assert set(ids) == expected
    assert pulled["cursor"] == len(expected)
    # The Python client's replica agrees with the Rust client's.
    cursor, entities = await client.pull("w")
    assert cursor == pulled["cursor"]
    assert sorted(e.id for e in entities) == sorted(ids)


async def test_two_refs_of_one_session_in_one_outbox_both_write(server: Server, tmp_path: Path) -> None:
    """An owner URI and an append share of one session, attached under two names of one
    outbox: each ref has its own client id, so their batchSeqs (1, 2, 3... per ref) never
    collide on the server, which counts them per (client, session)."""
    owner, _ = server.create_session("two refs")
    share, _ = server.share(owner, "append", "second writer")
    client = Client.open(tmp_path / "outbox.db", SyncOptions(max_batch_ops=5))
    client.attach("own", owner)
    client.attach("sh", share)
    names = ("own", "sh")
    client_ids = {name: client.outbox.ref(name).client_id for name in names}  # type: ignore[union-attr]
    assert client_ids["own"] != client_ids["sh"]
    rounds, per_round = 3, 12
    for round_no in range(rounds):
        for name in names:
            client.enqueue(name, [Put("message", f"{name}-{round_no}-{i}", {"i": i}) for i in range(per_round)])
        reports = await asyncio.wait_for(asyncio.gather(*(client.sync(name) for name in names)), 30)
        assert [(r.applied, r.duplicate, r.conflict, r.rejected) for r in reports] == [(per_round, 0, 0, 0)] * 2

    status = {s.name: (s.state, s.acked, s.pending + s.sent, s.last_error) for s in client.status()}
    assert status == {name: ("ok", rounds * per_round, 0, "") for name in names}, "nothing diverged"
    for name in names:
        batches = client.outbox.batch_seqs(name)
        assert [seq for seq, _, _ in batches] == list(range(1, 3 * rounds + 1)), "consecutive per ref"
        assert all(cid == client_ids[name] and acked for _, cid, acked in batches)

    pulled = cli_pull_json(owner, tmp_path / "pull.db")
    ids = sorted(e["id"] for e in pulled["entities"])
    expected = sorted(f"{name}-{r}-{i}" for name in names for r in range(rounds) for i in range(per_round))
    assert ids == expected
    assert pulled["cursor"] == len(expected)


async def test_concurrent_syncs_of_one_ref_send_each_batch_once(server: Server, tmp_path: Path) -> None:
    """Syncs of one ref run one at a time: the first delivers everything, the others wait
    and find nothing left to send, so no batch goes out twice (no `duplicate` ack)."""
    owner, _ = server.create_session("concurrent syncs")
    acks: List[BatchAck] = []
    client = Client.open(tmp_path / "outbox.db", SyncOptions(max_batch_ops=10, on_ack=acks.append))
    client.attach("w", owner)
    client.enqueue("w", [Put("message", f"m{i}", {"i": i}) for i in range(100)])
    reports = await asyncio.wait_for(asyncio.gather(*(client.sync("w") for _ in range(3))), 30)

    statuses = Counter(r.status for ack in acks for r in ack.results)
    assert statuses == {"applied": 100}, f"ack statuses {dict(statuses)}"
    assert sorted(ack.batch_seq for ack in acks) == list(range(1, 11)), "each batch acked once"
    assert sorted(r.batches for r in reports) == [0, 0, 10]
    assert sum(r.applied for r in reports) == 100 and sum(r.duplicate for r in reports) == 0
    assert client.status()[0].acked == 100
