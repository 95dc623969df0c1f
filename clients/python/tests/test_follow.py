"""A Python follower sees every op the Rust client writes, in seq order, once each, including
across a server crash and restart."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Dict, List

from capsync import AppliedOp, Client

from conftest import Server, cli_pull_json, cli_push, message_ops, write_jsonl


def rust_ops(prefix: str, n: int) -> List[Dict]:
    """Messages, a part under each, and a delete of every fifth part."""
    ops: List[Dict] = []
    for i in range(n):
        ops.append({"op": "put", "kind": "message", "id": f"{prefix}m{i}", "data": {"role": "user", "i": i}})
        ops.append({"op": "put", "kind": "part", "id": f"{prefix}p{i}", "parent": f"{prefix}m{i}", "data": {"text": str(i)}})
        if i % 5 == 0:
            ops.append({"op": "delete", "kind": "part", "id": f"{prefix}p{i}"})
    return ops


def as_line(op: AppliedOp) -> Dict:
    o = op.op
    if o.delete:
        return {"op": "delete", "kind": o.kind, "id": o.id}
    line = {"op": "put", "kind": o.kind, "id": o.id, "data": json.loads(o.data)}
    if o.parent:
        line["parent"] = o.parent
    return line


async def push(uri, ops_file: Path, outbox: Path) -> None:
    proc = await cli_push(uri, ops_file, outbox)
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, "capsync push failed"


def check_stream(seen: List[AppliedOp], expected: List[Dict]) -> None:
    assert [op.seq for op in seen] == list(range(1, len(expected) + 1)), "not in seq order, or a gap or duplicate"
    assert len({op.op.op_id for op in seen}) == len(seen), "an op was delivered twice"
    assert [as_line(op) for op in seen] == expected


async def wait_until(event: asyncio.Event, task: "asyncio.Task[None]", timeout: float) -> None:
    waiter = asyncio.ensure_future(event.wait())
    done, _ = await asyncio.wait({waiter, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task in done and not event.is_set():
        task.result()  # the follower ended early: raise its error
    assert done, "the follower did not see every op in time"


async def test_python_follower_sees_rust_writes_in_order(server: Server, tmp_path: Path) -> None:
    owner, _ = server.create_session("follow")
    client = Client.open(tmp_path / "follower.db")
    client.attach("f", owner)
    assert await client.pull("f") == (0, [])
    ops = rust_ops("", 120)
    seen: List[AppliedOp] = []
    replica_cursor_when_called: List[int] = []
    stop = asyncio.Event()

    def on_ops(run: List[AppliedOp]) -> None:
        # onOps has written the replica before the application sees the run.
        replica_cursor_when_called.append(client.replica("f")[0])
        assert replica_cursor_when_called[-1] == run[-1].seq
        seen.extend(run)
        if len(seen) >= len(ops):
            stop.set()

    follower = asyncio.ensure_future(client.follow("f", on_ops, stop=stop))
    await push(owner, write_jsonl(tmp_path / "ops.jsonl", ops), tmp_path / "rust.db")
    await wait_until(stop, follower, 30)
    await asyncio.wait_for(follower, 10)
    check_stream(seen, ops)
    cursor, entities = client.replica("f")
    assert cursor == len(ops)
    pulled = cli_pull_json(owner, tmp_path / "rust-pull.db")
    assert [(e.kind, e.id, e.parent, json.loads(e.data)) for e in entities] == [
        (e["kind"], e["id"], e["parent"], e["data"]) for e in pulled["entities"]
    ]


async def test_follower_resumes_from_its_cursor_after_a_server_crash(own_server: Server, tmp_path: Path) -> None:
    owner, _ = own_server.create_session("follow-crash")
    client = Client.open(tmp_path / "follower.db")
    client.attach("f", owner)
    await client.pull("f")
    first, second = message_ops("a", 150), message_ops("b", 150)
    seen: List[AppliedOp] = []
    half, stop = asyncio.Event(), asyncio.Event()

    def on_ops(run: List[AppliedOp]) -> None:
        seen.extend(run)
        if len(seen) >= len(first):
            half.set()
        if len(seen) >= len(first) + len(second):
            stop.set()

    follower = asyncio.ensure_future(client.follow("f", on_ops, stop=stop))
    await push(owner, write_jsonl(tmp_path / "a.jsonl", first), tmp_path / "rust.db")
    await wait_until(half, follower, 30)
    own_server.kill()
    own_server.start()  # same data dir, new port: re-attach while the follower retries
    moved = own_server.at_current_address(owner)
    client.attach("f", moved)
    await push(moved, write_jsonl(tmp_path / "b.jsonl", second), tmp_path / "rust.db")
    await wait_until(stop, follower, 30)
    await asyncio.wait_for(follower, 10)
    check_stream(seen, first + second)
    assert client.replica("f")[0] == len(first) + len(second)
