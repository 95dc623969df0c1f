"""Tests without a server: the shipped schema, sturdy URIs, error markers, the outbox."""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from pathlib import Path

import capnp
import pytest

import capsync
from capsync import CapsyncError, Client, SturdyUri, UriError
from capsync.errors import find_marker
from capsync.outbox import Outbox, uuid7

PACKAGE = Path(capsync.__file__).resolve().parent
REPO_SCHEMA = PACKAGE.parents[2] / "schema" / "capsync.capnp"
TOKEN = "csy_" + "A" * 20 + "-_" + "b" * 21  # well-formed, not a real secret


def test_shipped_schema_is_a_byte_copy_of_the_repository_schema() -> None:
    shipped = PACKAGE / "capsync.capnp"
    assert shipped.is_file(), "capsync/capsync.capnp is missing from the package"
    assert (PACKAGE / "py.typed").is_file()
    if not REPO_SCHEMA.is_file():
        pytest.skip("not in a capsync checkout: no ../../schema/capsync.capnp to compare with")
    assert shipped.read_bytes() == REPO_SCHEMA.read_bytes(), "clients/python/capsync/capsync.capnp differs from schema/capsync.capnp"


def test_schema_loads_with_the_pipelining_field() -> None:
    schema = capsync.load_schema()
    fields = schema.Gateway.schema.methods["redeem"].result_type.node.struct.fields
    assert [f.name for f in fields] == ["grant", "session", "admin", "space"]
    assert set(schema.Listener.schema.method_names_inherited) == {"onOps", "onEnd"}


def test_uri_repr_and_str_hide_the_token() -> None:
    uri = SturdyUri.parse(f"capsync://127.0.0.1:7420/{TOKEN}")
    body = TOKEN[4:]
    shown = (repr(uri), str(uri), f"{uri}", f"{uri!r}", repr(uri.token), str(uri.token), uri.redacted(), repr([uri]))
    assert not [i for i, text in enumerate(shown) if body in text], "a formatting shows the token"
    assert all("csy_<redacted>" in text for text in shown)
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(uri)
    assert uri.expose() == f"capsync://127.0.0.1:7420/{TOKEN}"
    assert (uri.address, uri.host, uri.port, uri.tls) == ("127.0.0.1:7420", "127.0.0.1", 7420, False)


def test_uri_rules_match_the_rust_parser() -> None:
    tls = SturdyUri.parse(f"  capsyncs://[::1]:7420/{TOKEN}\n")
    assert tls.tls and tls.host == "::1" and tls.port == 7420
    assert tls.expose().startswith("capsyncs://[::1]:7420/csy_")
    assert SturdyUri.parse(f"capsync://sync.example-1.com:7420/{TOKEN}").host == "sync.example-1.com"
    assert SturdyUri.parse(f"capsync://h:+80/{TOKEN}").port == 80  # Rust's u16 parse takes a '+'
    cases = {
        "http://x:1/a": "shape",
        f"capsync:/h:1/{TOKEN}": "shape",
        "capsync://h:1": "shape",
        f"capsync://nohost/{TOKEN}": "address",
        f"capsync://h:99999/{TOKEN}": "address",
        f"capsync://h:-1/{TOKEN}": "address",
        f"capsync://h: 1/{TOKEN}": "address",
        f"capsync://h:1_0/{TOKEN}": "address",
        f"capsync://:1/{TOKEN}": "address",
        f"capsync://bad host:1/{TOKEN}": "address",
        f"capsync://h\x07x:1/{TOKEN}": "address",
        f"capsync://[not-v6]:1/{TOKEN}": "address",
        f"capsync://[fe80::1%eth0]:1/{TOKEN}": "address",
        f"capsync://a_b:1/{TOKEN}": "address",
        f"capsync://h\u00e9:1/{TOKEN}": "address",
        f"capsync://{'x' * 254}:1/{TOKEN}": "address",
        "capsync://h:1/csy_x": "token",
        f"capsync://h:1/{TOKEN}/": "token",
        f"capsync://h:1/{TOKEN}x": "token",
        f"capsync://h:1/csy_{'!' * 43}": "token",
        f"capsync://h:1/{TOKEN[4:]}": "token",
        f"capsync://h:1/{TOKEN}\x1c": "token",  # Rust's trim keeps U+001C; Python's strip would not
    }
    for text, kind in cases.items():
        with pytest.raises(UriError) as caught:
            SturdyUri.parse(text)
        assert caught.value.kind == kind, f"case {list(cases).index(text)} gave {caught.value.kind}, not {kind}"
        assert TOKEN[4:] not in str(caught.value)
    assert SturdyUri.parse(f"capsync://{'x' * 253}:1/{TOKEN}").port == 1


def test_markers_are_found_and_overloaded_maps() -> None:
    assert find_marker("remote exception: capsync/revoked: share x") == "capsync/revoked"
    assert find_marker("capsync/unknown-token: no such token") == "capsync/unknown-token"
    assert find_marker("capsync/gapping") is None
    assert find_marker("disconnected") is None
    revoked = CapsyncError.from_exception(capnp.KjException("remote exception: capsync/revoked: gone", type="FAILED"))
    assert (revoked.marker, revoked.terminal_state, revoked.retryable) == ("capsync/revoked", "revoked", False)
    assert str(revoked) == "capsync/revoked: gone"
    overloaded = CapsyncError.from_exception(capnp.KjException("too busy", type="OVERLOADED"))
    assert overloaded.marker == "capsync/overloaded" and overloaded.retryable
    gap = CapsyncError.from_exception(capnp.KjException("capsync/gap: batch 3", type="FAILED"))
    assert gap.retryable and gap.terminal_state is None
    dropped = CapsyncError.from_exception(capnp.KjException("peer disconnected", type="DISCONNECTED"))
    assert dropped.marker is None and dropped.retryable
    leaked = CapsyncError(f"something about {TOKEN}")
    assert TOKEN[4:] not in str(leaked) and TOKEN[4:] not in repr(leaked)


def test_outbox_file_is_private_wal_and_fully_synchronous(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "outbox.db"
    outbox = Outbox(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert outbox._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert outbox._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def client_id(outbox: Outbox, name: str) -> bytes:
    row = outbox.ref(name)
    assert row is not None
    return row.client_id


def test_each_ref_has_its_own_client_id_kept_on_reattach(tmp_path: Path) -> None:
    """As in the Rust client: attach mints a random client id for a new name; re-attaching the
    name (same URI, or a new token or address) keeps it, with its next batchSeq."""
    path = tmp_path / "outbox.db"
    outbox = Outbox(path)
    uri, other_uri = f"capsync://127.0.0.1:1/{TOKEN}", f"capsync://127.0.0.2:2/csy_{'B' * 43}"
    outbox.attach("a", uri)
    outbox.attach("b", uri)
    first = client_id(outbox, "a")
    assert len(first) == 16 and len(client_id(outbox, "b")) == 16
    assert client_id(outbox, "b") != first, "every ref has its own client id"
    assert "uri" not in repr(outbox.ref("a")) and TOKEN[4:] not in repr(outbox.ref("a"))
    outbox.enqueue("a", [capsync.Op(uuid7(), "message", "m", "", b"{}")])
    assert outbox.form_batches("a", 10, 1 << 20) == 1
    outbox.set_ref_state("a", "revoked", "capsync/revoked: gone")
    outbox.attach("a", uri)
    assert client_id(outbox, "a") == first, "re-attaching the same URI keeps the client id"
    outbox.attach("a", other_uri)
    row = outbox.ref("a")
    assert row is not None and (row.client_id, row.uri, row.state, row.last_error) == (first, other_uri, "ok", "")
    outbox.enqueue("a", [capsync.Op(uuid7(), "message", "n", "", b"{}")])
    outbox.form_batches("a", 10, 1 << 20)
    assert outbox.batch_seqs("a") == [(1, first, False), (2, first, False)], "same id, next batchSeq"
    outbox.close()
    assert client_id(Outbox(path), "a") == first, "the client id is stored"
    assert client_id(Outbox(path), "b") != first


def test_version_1_outbox_gives_its_client_id_to_existing_refs(tmp_path: Path) -> None:
    """An outbox of schema version 1 had one client id (table meta): its refs keep using it,
    so batches already formed go on under the (client, session) sequence the server knows."""
    path = tmp_path / "v1.db"
    old_id = bytes(range(16))
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
        CREATE TABLE refs (name TEXT PRIMARY KEY, uri TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'ok',
            last_error TEXT NOT NULL DEFAULT '', session_id TEXT NOT NULL DEFAULT '',
            next_batch_seq INTEGER NOT NULL DEFAULT 1, ack_cursor INTEGER NOT NULL DEFAULT 0,
            created_at INTEGER NOT NULL);
        PRAGMA user_version = 1;
        """
    )
    conn.execute("INSERT INTO meta VALUES ('client_id', ?)", (old_id,))
    conn.execute("INSERT INTO refs (name, uri, next_batch_seq, created_at) VALUES ('w', ?, 4, 0)", (f"capsync://h:1/{TOKEN}",))
    conn.commit()
    conn.close()
    outbox = Outbox(path)
    assert outbox._conn.execute("PRAGMA user_version").fetchone()[0] == 3
    assert client_id(outbox, "w") == old_id
    outbox.attach("new", f"capsync://h:1/{TOKEN}")
    assert client_id(outbox, "new") not in (old_id, b"")
    outbox.enqueue("w", [capsync.Op(uuid7(), "message", "m", "", b"{}")])
    outbox.form_batches("w", 10, 1 << 20)
    assert outbox.batch_seqs("w") == [(4, old_id, False)]


# The outbox schema of version 2, as the previous client created it (no history ids, no
# healed count, no ack times).
_V2_SCHEMA = """
CREATE TABLE refs (name TEXT PRIMARY KEY, uri TEXT NOT NULL, client_id BLOB NOT NULL,
    state TEXT NOT NULL DEFAULT 'ok', last_error TEXT NOT NULL DEFAULT '',
    session_id TEXT NOT NULL DEFAULT '', next_batch_seq INTEGER NOT NULL DEFAULT 1,
    ack_cursor INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL);
CREATE TABLE ops (seq INTEGER PRIMARY KEY AUTOINCREMENT, op_id BLOB NOT NULL UNIQUE,
    ref_name TEXT NOT NULL REFERENCES refs(name), kind INTEGER NOT NULL, entity_id TEXT NOT NULL,
    parent_id TEXT NOT NULL, data BLOB NOT NULL, is_delete INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending', batch_seq INTEGER, attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '', ack_seq INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL);
CREATE INDEX ops_by_batch ON ops(ref_name, batch_seq);
CREATE INDEX ops_unbatched ON ops(ref_name, seq) WHERE batch_seq IS NULL;
CREATE TABLE batches (ref_name TEXT NOT NULL, batch_seq INTEGER NOT NULL, client_id BLOB NOT NULL,
    acked INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (ref_name, batch_seq)) WITHOUT ROWID;
CREATE TABLE replica_state (ref_name TEXT PRIMARY KEY, session_id TEXT NOT NULL, cursor INTEGER NOT NULL);
CREATE TABLE replica_entities (ref_name TEXT NOT NULL, kind INTEGER NOT NULL, id TEXT NOT NULL,
    parent_id TEXT NOT NULL, data BLOB NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (ref_name, kind, id));
PRAGMA user_version = 2;
"""


def test_version_2_outbox_upgrades_and_keeps_its_acked_ops(tmp_path: Path) -> None:
    """An outbox of schema version 2 gains history ids, the healed count and ack times; ops it
    had acked count as acked at the upgrade, so they are kept for the whole keep time."""
    path = tmp_path / "v2.db"
    ref_id = bytes(range(16))
    acked_id, pending_id = uuid7(), uuid7()
    conn = sqlite3.connect(path)
    conn.executescript(_V2_SCHEMA)
    conn.execute(
        "INSERT INTO refs (name, uri, client_id, next_batch_seq, ack_cursor, created_at) VALUES ('w', ?, ?, 2, 1, 0)",
        (f"capsync://h:1/{TOKEN}", ref_id),
    )
    conn.execute("INSERT INTO batches VALUES ('w', 1, ?, 1)", (ref_id,))
    for op_id, state, batch in ((acked_id, "acked", 1), (pending_id, "pending", None)):
        conn.execute(
            "INSERT INTO ops (op_id, ref_name, kind, entity_id, parent_id, data, is_delete, state, batch_seq, "
            "created_at) VALUES (?, 'w', 1, ?, '', ?, 0, ?, ?, 0)",
            (op_id, state, b"{}", state, batch),
        )
    conn.execute("INSERT INTO replica_state VALUES ('w', 's', 1)")
    conn.commit()
    conn.close()
    before = time.time_ns() // 1_000_000
    outbox = Outbox(path)
    after = time.time_ns() // 1_000_000
    assert outbox._conn.execute("PRAGMA user_version").fetchone()[0] == 3
    row = outbox.ref("w")
    assert row is not None and (row.client_id, row.history, row.healed) == (ref_id, "", 0)
    acked_at = dict(outbox._conn.execute("SELECT state, acked_at FROM ops"))
    assert before <= acked_at["acked"] <= after and acked_at["pending"] == 0
    assert outbox.replica_history("w") == "" and outbox.replica_cursor("w") == ("s", 1)
    assert outbox.last_acked_batch("w") == 1
    assert outbox.prune_acked("w", before - 1) == 0, "kept: acked at the upgrade"
    outbox.close()
    outbox = Outbox(path)  # opening again changes nothing
    assert outbox.counts("w").acked == 1
    assert outbox.prune_acked("w", after) == 1
    assert [state for _, state, _, _ in outbox.ops("w")] == ["pending"]
    outbox.close()


def test_heal_requeues_every_kept_op_under_a_new_client_id(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.attach("w", f"capsync://h:1/{TOKEN}")
    outbox.attach("other", f"capsync://h:1/{TOKEN}")
    old_id = client_id(outbox, "w")
    ops = [capsync.Op(uuid7(), "message", f"m{i}", "", b"{}") for i in range(6)]
    outbox.enqueue("w", ops[:5])
    outbox.enqueue("other", [capsync.Op(uuid7(), "message", "o", "", b"{}")])
    outbox.form_batches("w", 2, 1 << 20)  # batches 1 [m0 m1], 2 [m2 m3], 3 [m4]
    outbox.form_batches("other", 2, 1 << 20)

    def result(op: capsync.Op, status: str, seq: int) -> capsync.OpResult:
        return capsync.OpResult(op.op_id, status, seq, "" if seq else "no")

    outbox.record_progress("w", [1, 2, 3], [
        capsync.BatchAck(2, 1, (result(ops[0], "applied", 1), result(ops[1], "duplicate", 2))),
        capsync.BatchAck(2, 2, (result(ops[2], "rejected", 0), result(ops[3], "conflict", 0))),
    ])
    outbox.enqueue("w", ops[5:])  # unbatched
    assert outbox.note_history("w", "h1") is False
    states = [state for _, state, _, _ in outbox.ops("w")]
    assert states == ["acked", "acked", "rejected", "conflict", "sent", "pending"]
    assert outbox.last_acked_batch("w") == 2

    new_id = uuid7()
    assert outbox.heal("w", new_id, "h2") == 2
    rows = [(op.id, state, batch) for op, state, batch, _ in outbox.ops("w")]
    assert rows == [
        ("m0", "pending", None), ("m1", "pending", None), ("m2", "rejected", 0), ("m3", "conflict", 0),
        ("m4", "pending", None), ("m5", "pending", None),
    ]
    row = outbox.ref("w")
    assert row is not None and (row.client_id, row.history, row.healed) == (new_id, "h2", 2)
    assert outbox.batch_seqs("w") == [] and outbox.last_acked_batch("w") == 0
    assert outbox.form_batches("w", 2, 1 << 20) == 2
    formed = outbox.unacked_batches("w")
    assert [(b.batch_seq, b.client_id, [op.id for op in b.ops]) for b in formed] == [
        (1, new_id, ["m0", "m1"]), (2, new_id, ["m4", "m5"]),
    ], "in the order they were made, rejected and conflicting ops left out"
    assert client_id(outbox, "other") != old_id and outbox.batch_seqs("other")[0][0] == 1, "other refs untouched"
    assert outbox.counts("other").pending == 1
    assert outbox.heal("w", uuid7()) == 0
    assert outbox.ref("w").history == "h2" and outbox.ref("w").healed == 2  # type: ignore[union-attr]


def test_op_ids_are_increasing_uuid7() -> None:
    ids = [uuid7() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    for op_id in ids[:50]:
        assert len(op_id) == 16 and op_id[6] >> 4 == 7 and op_id[8] >> 6 == 0b10


def test_put_is_durable_and_batches_are_formed_once(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    client = Client.open(path, capsync.SyncOptions(max_batch_ops=3))
    client.attach("w", f"capsync://127.0.0.1:1/{TOKEN}")
    ids = [client.put("w", "message", f"m{i}", {"i": i}) for i in range(7)]
    ids.append(client.put("w", "part", "p1", '{"text":"x"}', parent="m1"))
    ids.append(client.delete("w", "message", "m0"))
    # Durable: another connection (as after a crash) sees every op.
    other = sqlite3.connect(path)
    assert [bytes(r[0]) for r in other.execute("SELECT op_id FROM ops ORDER BY seq")] == ids
    other.close()
    outbox = client.outbox
    assert outbox.form_batches("w", 3, 1 << 20) == 3
    formed = outbox.unacked_batches("w")
    assert [b.batch_seq for b in formed] == [1, 2, 3]
    assert [len(b.ops) for b in formed] == [3, 3, 3]
    assert all(b.client_id == client_id(outbox, "w") for b in formed)
    assert [op.op_id for b in formed for op in b.ops] == ids
    # Formed once: forming again changes nothing; later ops get the next batchSeq.
    assert outbox.form_batches("w", 1, 1) == 0
    assert outbox.unacked_batches("w") == formed
    client.put("w", "message", "late", {})
    assert outbox.form_batches("w", 3, 1 << 20) == 1
    assert [b.batch_seq for b in outbox.unacked_batches("w")] == [1, 2, 3, 4]


def test_invalid_changes_queue_nothing(tmp_path: Path) -> None:
    client = Client.open(tmp_path / "outbox.db")
    client.attach("w", f"capsync://127.0.0.1:1/{TOKEN}")
    bad = [
        ("widget", "x", {}, ""),
        ("message", "", {}, ""),
        ("message", "x" * 257, {}, ""),
        ("message", "x", b"{not json", ""),
        ("message", "x", b"\xff", ""),
        ("message", "x", "NaN", ""),
        ("part", "p", {}, ""),
    ]
    for kind, eid, data, parent in bad:
        with pytest.raises(capsync.InvalidInputError):
            client.put("w", kind, eid, data, parent=parent)
    with pytest.raises(capsync.InvalidInputError):
        client.put("nope", "message", "x", {})
    assert client.status()[0].pending == 0
    with pytest.raises(UriError):
        client.attach("w2", "capsync://h:1/not-a-token")
