"""Refusals: a revoked share or session stops the ref (state stored, ops kept, later syncs
raise at once), an unknown token likewise (and no error text carries the token), a diverged
batch stops the ref, a gap is retried."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import List

import pytest

import capsync.connection
from capsync import AppliedOp, CapsyncError, Client, SturdyUri, SyncOptions

from conftest import Server


def forbid_network(monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a stopped ref must not connect")

    monkeypatch.setattr(capsync.connection.Connection, "open", classmethod(lambda cls, *a, **k: refuse()))


def unacked(client: Client, name: str) -> int:
    status = {s.name: s for s in client.status()}[name]
    return status.pending + status.sent


async def test_revoked_share_stops_the_ref_and_keeps_its_ops(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    owner, _ = server.create_session("revoke share")
    share, share_id = server.share(owner, "read,append", "to revoke")
    client = Client.open(tmp_path / "outbox.db")
    client.attach("sh", share)
    client.put("sh", "message", "before", {"n": 1})
    report = await asyncio.wait_for(client.sync("sh"), 30)
    assert report.applied == 1

    server.admin("revoke-share", share_id)
    kept = client.put("sh", "message", "after", {"n": 2})
    with pytest.raises(CapsyncError) as refused:
        await asyncio.wait_for(client.sync("sh"), 30)
    assert refused.value.marker == "capsync/revoked"
    assert not refused.value.retryable
    status = client.status()[0]
    assert (status.state, status.acked, status.pending + status.sent) == ("revoked", 1, 1)
    assert "capsync/revoked" in status.last_error
    assert client.outbox.op_state(kept)[0] in ("pending", "sent"), "the op is kept in the outbox"

    # Later syncs raise at once, without touching the network.
    forbid_network(monkeypatch)
    with pytest.raises(CapsyncError) as again:
        await client.sync("sh")
    assert again.value.marker == "capsync/revoked"
    assert unacked(client, "sh") == 1
    monkeypatch.undo()

    # The owner still writes; re-attaching the name with the owner's URI delivers the kept op.
    client.attach("sh", owner)
    report = await asyncio.wait_for(client.sync("sh"), 30)
    assert (report.applied, client.status()[0].state, unacked(client, "sh")) == (1, "ok", 0)


async def test_revoked_session_stops_sync_and_follow(server: Server, tmp_path: Path) -> None:
    owner, session_id = server.create_session("revoke session")
    client = Client.open(tmp_path / "outbox.db")
    client.attach("own", owner)
    client.attach("reader", owner)
    client.put("own", "message", "m1", {})
    await asyncio.wait_for(client.sync("own"), 30)
    await client.pull("reader")
    seen: List[AppliedOp] = []
    subscribed = asyncio.Event()

    def on_ops(run: List[AppliedOp]) -> None:
        seen.extend(run)
        subscribed.set()

    follower = asyncio.ensure_future(client.follow("reader", on_ops))
    client.put("own", "message", "m2", {})
    await asyncio.wait_for(client.sync("own"), 30)
    await asyncio.wait_for(subscribed.wait(), 30)  # the follower is live

    server.admin("revoke-session", session_id)
    with pytest.raises(CapsyncError) as ended:
        await asyncio.wait_for(follower, 30)
    assert ended.value.marker == "capsync/revoked"
    assert [op.op.id for op in seen] == ["m2"]

    client.put("own", "message", "m3", {})
    with pytest.raises(CapsyncError) as refused:
        await asyncio.wait_for(client.sync("own"), 30)
    assert refused.value.marker == "capsync/revoked"
    states = {s.name: s.state for s in client.status()}
    assert states == {"own": "revoked", "reader": "revoked"}
    assert unacked(client, "own") == 1


async def test_unknown_token_is_refused_without_showing_it(server: Server, tmp_path: Path) -> None:
    owner, _ = server.create_session("unknown")
    fake = "csy_" + "Zz9-_" * 8 + "abc"
    client = Client.open(tmp_path / "outbox.db")
    client.attach("x", SturdyUri.parse(f"capsync://{server.address}/{fake}"))
    client.put("x", "message", "m", {})
    with pytest.raises(CapsyncError) as refused:
        await asyncio.wait_for(client.sync("x"), 30)
    assert refused.value.marker == "capsync/unknown-token"
    status = client.status()[0]
    assert status.state == "unknown-token"
    texts = (str(refused.value), repr(refused.value), status.last_error, status.uri, repr(status))
    leaks = [i for i, text in enumerate(texts) if fake[4:] in text or owner.token.expose()[4:] in text]
    assert not leaks, f"texts {leaks} show a token"  # (the texts themselves are not printed)


async def test_diverged_batch_stops_the_ref(server: Server, tmp_path: Path) -> None:
    """An outbox restored from an old backup resends batchSeq 1 with other opIds: the server
    answers capsync/diverged (never duplicate), and the ref stops with its ops kept."""
    owner, _ = server.create_session("diverged")
    path = tmp_path / "outbox.db"
    client = Client.open(path)
    client.attach("w", owner)
    client.close()
    backup = tmp_path / "backup.db"
    shutil.copyfile(path, backup)
    client = Client.open(path)
    client.put("w", "message", "original", {})
    assert (await asyncio.wait_for(client.sync("w"), 30)).applied == 1
    client.close()

    restored = Client.open(backup)  # same client id, batchSeq 1 again, different ops
    restored.put("w", "message", "other", {})
    with pytest.raises(CapsyncError) as refused:
        await asyncio.wait_for(restored.sync("w"), 30)
    assert refused.value.marker == "capsync/diverged"
    assert restored.status()[0].state == "diverged"
    assert unacked(restored, "w") == 1


async def test_gap_is_retryable_and_keeps_the_batch(server: Server, tmp_path: Path) -> None:
    """A batchSeq beyond the server's last + 1 gets capsync/gap (after the server waited up to
    2 s for the missing batches), which is retryable as in the Rust client: the ref is not
    stopped, the batch is not re-formed, its op stays queued."""
    owner, _ = server.create_session("gap")
    client = Client.open(tmp_path / "outbox.db", SyncOptions(max_attempts=1))
    client.attach("w", owner)
    with client.outbox._tx() as c:  # as if batches 1..4 had been lost
        c.execute("UPDATE refs SET next_batch_seq = 5 WHERE name = 'w'")
    client.put("w", "message", "m", {})
    with pytest.raises(CapsyncError) as refused:
        await asyncio.wait_for(client.sync("w"), 30)
    assert refused.value.marker == "capsync/gap" and refused.value.retryable
    status = client.status()[0]
    assert (status.state, status.pending + status.sent) == ("unreachable", 1)
    assert [seq for seq, _, _ in client.outbox.batch_seqs("w")] == [5], "the batch is not re-formed"
