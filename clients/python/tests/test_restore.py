"""A server restored from an older backup is healed by its Python clients: the restore drill of
docs/OPERATIONS.md ("What a restore costs clients"), as ``tests/restore_drill.rs`` runs it for
the Rust client. Ops acked after the backup are re-delivered (same opIds: nothing twice),
replicas and followers pulled before the restore are pulled again, and acked ops are kept for
``keep_acked`` and pruned after."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from capsync import Client, Entity, Put, SyncOptions

from conftest import Server, backup, cli_pull_json, need_binary, restore


def keyed(entities: List[Entity]) -> Dict[Tuple[str, str], Tuple[str, object]]:
    return {(e.kind, e.id): (e.parent, e.json()) for e in entities}


def keyed_json(pulled: Dict) -> Dict[Tuple[str, str], Tuple[str, object]]:
    out: Dict[Tuple[str, str], Tuple[str, object]] = {}
    for e in pulled["entities"]:
        key = (e["kind"], e["id"])
        assert key not in out, f"{key} twice"
        out[key] = (e["parent"], e["data"])
    return out


def messages(start: int, stop: int) -> List[Put]:
    return [Put("message", f"m{i:03}", {"i": i}) for i in range(start, stop)]


class Servers:
    """The original server and, once restored, the one serving the restored copy at the same
    address (the URIs clients hold keep working)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.original = Server(tmp_path / "data").start()
        self.restored: Optional[Server] = None
        self.backup_file = tmp_path / "backup.db"

    def backup(self) -> None:
        backup(self.original.data_dir, self.backup_file)

    def restore(self) -> Server:
        """Stops the original (SIGTERM), restores the backup into a new data dir and serves
        it on the original's address."""
        self.original.stop()
        restore(self.backup_file, self.tmp_path / "restored")
        self.restored = Server(self.tmp_path / "restored").start_at(self.original.address)
        return self.restored

    def close(self) -> None:
        for server in (self.original, self.restored):
            if server is not None:
                server.kill()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    need_binary()
    s = Servers(tmp_path)
    yield s
    s.close()


async def wait_for_replica(client: Client, name: str, want: Dict, follower: "asyncio.Future[None]") -> None:
    deadline = time.monotonic() + 30
    while keyed(client.replica(name)[1]) != want:
        if follower.done():
            follower.result()  # the follower ended early: raise its error
            raise AssertionError("the follower ended")
        assert time.monotonic() < deadline, "the follower did not end with the server's entities"
        await asyncio.sleep(0.05)


async def test_restore_drill_heals_the_server_and_re_pulls_replicas(servers: Servers, tmp_path: Path) -> None:
    owner, _ = servers.original.create_session("drill")
    writer = Client.open(tmp_path / "writer.db", SyncOptions(max_batch_ops=20))
    writer.attach("w", owner)
    writer.enqueue("w", messages(0, 50))
    first = await writer.sync("w")
    assert (first.applied, first.healed) == (50, 0)

    # A follower across the whole drill, and a replica pulled just before the restore.
    follower = Client.open(tmp_path / "follower.db", SyncOptions(backoff_base=0.05))
    follower.attach("f", owner)
    stop = asyncio.Event()
    following = asyncio.ensure_future(follower.follow("f", stop=stop))
    reader = Client.open(tmp_path / "reader.db")
    reader.attach("r", owner)

    servers.backup()  # the server keeps running
    writer.enqueue("w", messages(50, 100))
    second = await writer.sync("w")
    assert (second.applied, second.healed) == (50, 0), "acked, and not in the backup"
    # A client that keeps nothing it acked: what it wrote after the backup is lost for good,
    # so the replicas below hold entities the restored server will not have (and lack m000).
    forgetful = Client.open(tmp_path / "forgetful.db", SyncOptions(keep_acked=0))
    forgetful.attach("x", owner)
    forgetful.put("x", "message", "lost", {"gone": True})
    forgetful.delete("x", "message", "m000")
    await forgetful.sync("x")
    assert forgetful.status()[0].acked == 0
    cursor, before = await reader.pull("r")
    assert cursor == 102
    assert ("message", "lost") in keyed(before) and ("message", "m000") not in keyed(before)
    await wait_for_replica(follower, "f", keyed(before), following)

    servers.restore()
    assert len(cli_pull_json(owner, tmp_path / "pull-lost.db")["entities"]) == 50, "the restore lost the second sync"

    report = await writer.sync("w")
    assert report.healed == 100, report
    assert (report.duplicate, report.applied, report.conflict, report.rejected) == (50, 50, 0, 0)
    status = writer.status()[0]
    assert (status.healed, status.pending, status.sent, status.acked) == (100, 0, 0, 100), status
    pulled = keyed_json(cli_pull_json(owner, tmp_path / "pull-after.db"))
    assert pulled == {("message", f"m{i:03}"): ("", {"i": i}) for i in range(100)}, "every acked op, exactly once"

    # The healed log goes on past the replicas' cursors (102), so only a replica pulled again
    # from a snapshot can match it: catching up after 102 would keep "lost", lack m000...
    writer.enqueue("w", messages(100, 105))
    assert (await writer.sync("w")).applied == 5
    pulled = keyed_json(cli_pull_json(owner, tmp_path / "pull-more.db"))
    assert len(pulled) == 105
    # The replica pulled before the restore is from another history: pulled again.
    cursor, after = await reader.pull("r")
    assert cursor == 105 and keyed(after) == pulled
    # The follower saw the history change, pulled again and follows the healed log.
    await wait_for_replica(follower, "f", pulled, following)
    stop.set()
    await asyncio.wait_for(following, 10)

    # Healed once: the next sync re-delivers nothing.
    again = await writer.sync("w")
    assert (again.batches, again.healed) == (0, 0)
    assert writer.status()[0].healed == 100
    for client in (writer, follower, reader, forgetful):
        client.close()


async def test_a_gap_below_acked_batches_heals_without_a_history(servers: Servers, tmp_path: Path) -> None:
    """A ref that never recorded a history (an outbox from before history ids, say) heals when
    the server answers a gap at or below a batchSeq it had acknowledged."""
    owner, _ = servers.original.create_session("gap")
    path = tmp_path / "writer.db"
    writer = Client.open(path, SyncOptions(max_batch_ops=25))
    writer.attach("w", owner)
    writer.enqueue("w", messages(0, 50))
    await writer.sync("w")
    servers.backup()
    writer.enqueue("w", messages(50, 100))
    await writer.sync("w")
    assert writer.outbox.last_acked_batch("w") == 4
    servers.restore()
    other = sqlite3.connect(path)
    other.execute("UPDATE refs SET history = ''")
    other.commit()
    other.close()
    writer.enqueue("w", messages(100, 101))  # batch 5; the restored server expects 3
    report = await writer.sync("w")
    assert report.healed == 100, report
    assert (report.duplicate, report.applied) == (50, 51)
    assert writer.outbox.ref("w") is not None and writer.outbox.ref("w").history != ""  # type: ignore[union-attr]
    pulled = keyed_json(cli_pull_json(owner, tmp_path / "pull.db"))
    assert sorted(pulled) == [("message", f"m{i:03}") for i in range(101)]
    writer.close()


async def test_acked_ops_are_kept_then_pruned_after_a_sync(server: Server, tmp_path: Path) -> None:
    owner, _ = server.create_session("keep")
    keeper = Client.open(tmp_path / "keeper.db")
    keeper.attach("k", owner)
    keeper.enqueue("k", messages(0, 10))
    await keeper.sync("k")
    assert keeper.status()[0].acked == 10, "kept by default"

    pruner = Client.open(tmp_path / "pruner.db", SyncOptions(keep_acked=0))
    pruner.attach("p", owner)
    pruner.enqueue("p", messages(10, 20))
    report = await pruner.sync("p")
    assert report.applied == 10
    status = pruner.status()[0]
    assert (status.acked, status.pending, status.sent) == (0, 0, 0), "pruned past the keep time"
    assert pruner.outbox.ops("p") == []
    # The keeper prunes too once its ops are older than its keep time.
    keeper.options.keep_acked = 0
    assert (await keeper.sync("k")).batches == 0
    assert keeper.status()[0].acked == 0
    keeper.close()
    pruner.close()


async def test_nothing_queued_and_an_unreachable_server_is_no_error(own_server: Server, tmp_path: Path) -> None:
    """With acked ops kept and nothing queued, a sync redeems once to look at the server's
    history; a server it cannot reach is no failure of that sync."""
    owner, _ = own_server.create_session("check")
    client = Client.open(tmp_path / "outbox.db", SyncOptions(connect_timeout=2))
    client.attach("w", owner)
    client.put("w", "message", "m", {})
    await client.sync("w")
    history = client.outbox.ref("w").history  # type: ignore[union-attr]
    assert history, "the grant's history is recorded"
    own_server.kill()
    report = await asyncio.wait_for(client.sync("w"), 20)
    assert (report.batches, report.healed) == (0, 0)
    assert client.status()[0].acked == 1
    client.close()


def test_the_history_is_recorded_from_the_first_grant(tmp_path: Path) -> None:
    """Offline: the first history id is recorded, never reported as a change; a later
    different one is reported (and left for heal to record); an empty one never counts."""
    from capsync.outbox import Outbox

    outbox = Outbox(tmp_path / "outbox.db")
    outbox.attach("w", "capsync://127.0.0.1:1/csy_" + "A" * 20 + "-_" + "b" * 21)
    assert outbox.note_history("w", "") is False
    assert outbox.ref("w").history == ""  # type: ignore[union-attr]
    assert outbox.note_history("w", "h1") is False
    assert outbox.note_history("w", "h1") is False
    assert outbox.note_history("w", "") is False
    assert outbox.note_history("w", "h2") is True
    assert outbox.ref("w").history == "h1"  # type: ignore[union-attr]
    outbox.close()

