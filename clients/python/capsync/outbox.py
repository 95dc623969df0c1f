"""The client database: attached refs, the outbox of ops not yet acknowledged, and replicas.

One SQLite file (standard library ``sqlite3``), created with mode 0600 because it holds sturdy
URIs, in WAL mode with ``PRAGMA synchronous=FULL``: a transaction is durable when its commit
returns, so an op the application was told about survives a crash.

Tables:

- ``refs``: a sturdy URI attached under a name, the ref's client id (16 random bytes minted
  when the name is first attached and kept when it is re-attached, as in the Rust client:
  the server counts batchSeqs per (client, session), so two refs of one session never share
  a sequence), its state (``ok``, ``unreachable``, ``revoked``, ``expired``,
  ``unknown-token``, ``denied``, ``diverged``), last error, the session id once known, the
  server's cursor in the latest ack, the next batchSeq, the server's history id in the
  latest grant (``''`` before the first) and how many acked ops it re-delivered (``healed``).
- ``ops``: every op the application made, in order: opId (a 16-byte UUIDv7 minted once),
  kind, entity id, parent, data, delete flag, state (``pending`` -> ``sent`` -> ``acked`` |
  ``rejected`` | ``conflict``), batch, attempts, last error, ack seq, and when it was acked
  (``acked_at``, Unix ms). Acked ops are kept for a while (``SyncOptions.keep_acked``) so a
  server restored from an older backup can be healed (:meth:`Outbox.heal`).
- ``batches``: batches as formed. A batch is formed once per ref (with the ref's client id
  and the ref's next batchSeq: 1, 2, 3...) and never re-formed or reused, so a replay resends
  the very same batches, opIds and order. Only healing a restored server drops a ref's
  batches, and it gives the ref a new client id with them.
- ``replica_state`` / ``replica_entities``: local copies of sessions at a cursor, each with
  the server history id it was pulled from.

Schema version 1 kept one client id per outbox file (a ``meta`` table); opening such a file
upgrades it, giving every existing ref that id, so batches already formed and sent keep the
(client, session) sequence the server knows. Refs attached later get their own. Version 3
added the history ids, ``healed`` and ``acked_at``; ops acked before the upgrade count as
acked at the upgrade (they are kept for the whole keep time).

The Rust client keeps the same information in ``persistence/src/client``; this file is the
Python client's own format, not shared with the Rust CLI's outbox.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from .errors import CapsyncError

__all__ = [
    "KINDS",
    "Entity",
    "Op",
    "AppliedOp",
    "OpResult",
    "BatchAck",
    "FormedBatch",
    "RefRow",
    "OpCounts",
    "Outbox",
    "uuid7",
]

#: Entity kinds, in the order of the schema's ``EntityKind`` enum (and of replica listings).
KINDS = ("session", "message", "part", "diff", "model")
_KIND_CODE = {k: i for i, k in enumerate(KINDS)}

_SCHEMA_VERSION = 3
_SCHEMA = """
CREATE TABLE IF NOT EXISTS refs (
    name TEXT PRIMARY KEY,
    uri TEXT NOT NULL,                      -- a secret, never print it
    client_id BLOB NOT NULL,                -- 16 bytes, per ref: batchSeqs count per (client, session)
    state TEXT NOT NULL DEFAULT 'ok',
    last_error TEXT NOT NULL DEFAULT '',
    session_id TEXT NOT NULL DEFAULT '',
    next_batch_seq INTEGER NOT NULL DEFAULT 1,
    ack_cursor INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    history TEXT NOT NULL DEFAULT '',       -- the server's history id in the latest grant
    healed INTEGER NOT NULL DEFAULT 0       -- acked ops re-delivered to a restored server
);
CREATE TABLE IF NOT EXISTS ops (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op_id BLOB NOT NULL UNIQUE,             -- UUIDv7, minted once
    ref_name TEXT NOT NULL REFERENCES refs(name),
    kind INTEGER NOT NULL,                  -- index into KINDS
    entity_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    data BLOB NOT NULL,
    is_delete INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',  -- pending, sent, acked, rejected, conflict
    batch_seq INTEGER,                      -- NULL until batched, then fixed forever
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    ack_seq INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    acked_at INTEGER NOT NULL DEFAULT 0     -- Unix ms of the ack (0 until answered)
);
CREATE INDEX IF NOT EXISTS ops_by_batch ON ops(ref_name, batch_seq);
CREATE INDEX IF NOT EXISTS ops_unbatched ON ops(ref_name, seq) WHERE batch_seq IS NULL;
CREATE TABLE IF NOT EXISTS batches (
    ref_name TEXT NOT NULL,
    batch_seq INTEGER NOT NULL,
    client_id BLOB NOT NULL,
    acked INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (ref_name, batch_seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS replica_state (
    ref_name TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    cursor INTEGER NOT NULL,
    history TEXT NOT NULL DEFAULT ''        -- the server history id it was pulled from
);
CREATE TABLE IF NOT EXISTS replica_entities (
    ref_name TEXT NOT NULL,
    kind INTEGER NOT NULL,
    id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    data BLOB NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (ref_name, kind, id)
);
"""
# Version 1 -> 2: the outbox's one client id (table ``meta``) becomes each existing ref's own.
_UPGRADE_V1 = """
ALTER TABLE refs ADD COLUMN client_id BLOB NOT NULL DEFAULT x'';
UPDATE refs SET client_id = coalesce((SELECT value FROM meta WHERE key = 'client_id'), x'');
DROP TABLE meta
"""
# Version 2 -> 3: history ids, the healed count and ack times. Added to tables that lack them
# (a table missing altogether is made by _SCHEMA with them).
_COLUMNS_V3 = (
    ("refs", "history", "TEXT NOT NULL DEFAULT ''"),
    ("refs", "healed", "INTEGER NOT NULL DEFAULT 0"),
    ("ops", "acked_at", "INTEGER NOT NULL DEFAULT 0"),
    ("replica_state", "history", "TEXT NOT NULL DEFAULT ''"),
)


def kind_code(kind: str) -> int:
    """The schema's ``EntityKind`` ordinal of ``kind``."""
    return _KIND_CODE[kind]


_uuid7_lock = threading.Lock()
_uuid7_last = [0, 0]  # [unix ms, 12-bit counter]


def uuid7() -> bytes:
    """A fresh UUIDv7 (RFC 9562) as 16 bytes: 48-bit Unix ms, then a 12-bit counter that keeps
    ids minted in the same millisecond increasing in this process, then 62 random bits."""
    with _uuid7_lock:
        ms = time.time_ns() // 1_000_000
        last_ms, counter = _uuid7_last
        if ms <= last_ms:
            ms, counter = last_ms, counter + 1
            if counter > 0xFFF:
                ms, counter = ms + 1, 0
        else:
            counter = secrets.randbits(8)  # leave room for the counter to grow
        _uuid7_last[0], _uuid7_last[1] = ms, counter
    rand_b = secrets.randbits(62)
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= counter << 64
    value |= 0b10 << 62
    value |= rand_b
    return value.to_bytes(16, "big")


@dataclass(frozen=True)
class Entity:
    """A whole entity: ``kind`` is one of :data:`KINDS`, ``data`` UTF-8 JSON bytes."""

    kind: str
    id: str
    parent: str
    data: bytes

    def json(self) -> object:
        """``data`` decoded as JSON."""
        import json

        return json.loads(self.data.decode("utf-8"))


@dataclass(frozen=True)
class Op:
    """One change with its opId: a put of ``(kind, id, parent, data)`` or, with ``delete``, a
    delete of ``(kind, id)``."""

    op_id: bytes
    kind: str
    id: str
    parent: str = ""
    data: bytes = b""
    delete: bool = False

    def size(self) -> int:
        """What the op weighs against a batch's byte limit (as the Rust client counts it)."""
        if self.delete:
            return len(self.id.encode())
        return len(self.data) + len(self.id.encode()) + len(self.parent.encode())


@dataclass(frozen=True)
class AppliedOp:
    """An op as the server applied it, with its ``seq`` in the session's log."""

    seq: int
    op: Op


@dataclass(frozen=True)
class OpResult:
    """The server's answer for one op: status ``applied``, ``duplicate``, ``conflict`` or
    ``rejected``; ``seq`` for applied and duplicate; ``reason`` for conflict and rejected."""

    op_id: bytes
    status: str
    seq: int
    reason: str


@dataclass(frozen=True)
class BatchAck:
    """An ``Ack``: the session's cursor after the batch, the batchSeq and one result per op."""

    cursor: int
    batch_seq: int
    results: Tuple[OpResult, ...]


@dataclass(frozen=True)
class FormedBatch:
    """A batch as formed: its batchSeq, the client id it was formed with, its ops in order."""

    batch_seq: int
    client_id: bytes
    ops: Tuple[Op, ...]


@dataclass
class RefRow:
    """An attached ref. ``uri`` holds a secret and is left out of ``repr``; ``client_id`` is
    the ref's own (16 bytes), the one its batches are sent with; ``history`` the server's
    history id in the latest grant (``''`` before the first); ``healed`` how many acked ops it
    re-delivered to a server restored from an older backup."""

    name: str
    uri: str = field(repr=False)
    state: str
    last_error: str
    session_id: str
    ack_cursor: int
    client_id: bytes
    history: str = ""
    healed: int = 0


@dataclass(frozen=True)
class OpCounts:
    """How many ops of a ref are in each state."""

    pending: int = 0
    sent: int = 0
    acked: int = 0
    rejected: int = 0
    conflict: int = 0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Outbox:
    """The client database (see the module docs). Thread-safe: every method takes a lock and
    runs as one transaction, so the async client can run them on worker threads."""

    def __init__(self, path: "os.PathLike[str] | str") -> None:
        self.path = os.fspath(path)
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        _create_private(self.path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
        self._conn.execute("PRAGMA busy_timeout = 10000")
        mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise CapsyncError(f"the outbox {self.path} cannot use WAL (journal mode {mode})", kind="storage")
        self._conn.execute("PRAGMA synchronous = FULL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        with self._tx():
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise CapsyncError(
                    f"the outbox {self.path} has schema version {version}; this client knows {_SCHEMA_VERSION}",
                    kind="storage",
                )
            if version == 1:
                _run_script(self._conn, _UPGRADE_V1)
            _run_script(self._conn, _SCHEMA)
            if 0 < version < 3:
                for table, column, decl in _COLUMNS_V3:
                    columns = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
                    if column not in columns:
                        self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
                # Ops acked before the upgrade count as acked now: kept for the whole keep time.
                self._conn.execute(
                    "UPDATE ops SET acked_at = ? WHERE state = 'acked' AND acked_at = 0", (_now_ms(),)
                )
            if version != _SCHEMA_VERSION:
                self._conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def close(self) -> None:
        """Closes the database."""
        with self._lock:
            self._conn.close()

    # -- transactions ---------------------------------------------------------------------

    class _Tx:
        def __init__(self, outbox: "Outbox", immediate: bool) -> None:
            self.outbox = outbox
            self.immediate = immediate

        def __enter__(self) -> sqlite3.Connection:
            self.outbox._lock.acquire()
            try:
                self.outbox._conn.execute("BEGIN IMMEDIATE" if self.immediate else "BEGIN")
            except BaseException:
                self.outbox._lock.release()
                raise
            return self.outbox._conn

        def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
            try:
                if exc_type is None:
                    self.outbox._conn.execute("COMMIT")
                else:
                    self.outbox._conn.execute("ROLLBACK")
            finally:
                self.outbox._lock.release()

    def _tx(self, immediate: bool = True) -> "Outbox._Tx":
        return Outbox._Tx(self, immediate)

    def _read(self, sql: str, params: Sequence[object] = ()) -> List[Tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # -- refs -------------------------------------------------------------------------------

    def attach(self, name: str, uri: str) -> None:
        """Attaches ``uri`` under ``name`` with a fresh random client id (16 bytes).

        Re-attaching a name (the Rust client's ``attach``, exactly) replaces its URI (a rotated
        token, a new address) and clears a terminal state, but keeps everything else: its
        client id and next batchSeq, its batches and queued ops, so batches already formed
        are resent under the same (client, batchSeq)."""
        with self._tx() as c:
            c.execute(
                "INSERT INTO refs (name, uri, client_id, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET uri = excluded.uri, state = 'ok', last_error = ''",
                (name, uri, uuid.uuid4().bytes, _now_ms()),
            )

    def refs(self) -> List[RefRow]:
        """Every ref, by name."""
        rows = self._read(f"SELECT {_REF_COLUMNS} FROM refs ORDER BY name")
        return [_ref_row(row) for row in rows]

    def ref(self, name: str) -> Optional[RefRow]:
        """The ref named ``name``, if attached."""
        rows = self._read(f"SELECT {_REF_COLUMNS} FROM refs WHERE name = ?", (name,))
        return _ref_row(rows[0]) if rows else None

    def set_ref_state(self, name: str, state: str, last_error: str) -> None:
        """Records the ref's state and last error (``last_error`` must hold no token)."""
        with self._tx() as c:
            c.execute("UPDATE refs SET state = ?, last_error = ? WHERE name = ?", (state, last_error, name))

    def set_session_id(self, name: str, session_id: str) -> None:
        """Records the session a ref's token refers to (learned from a grant)."""
        with self._tx() as c:
            c.execute(
                "UPDATE refs SET session_id = ? WHERE name = ? AND session_id <> ?", (session_id, name, session_id)
            )

    # -- the outbox -------------------------------------------------------------------------

    def enqueue(self, name: str, ops: Iterable[Op]) -> None:
        """Commits ``ops`` to the outbox of ``name`` in one durable transaction."""
        now = _now_ms()
        with self._tx() as c:
            if c.execute("SELECT 1 FROM refs WHERE name = ?", (name,)).fetchone() is None:
                raise CapsyncError(f"no ref named {name}; attach it first", kind="invalid")
            c.executemany(
                "INSERT INTO ops (op_id, ref_name, kind, entity_id, parent_id, data, is_delete, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (op.op_id, name, _KIND_CODE[op.kind], op.id, op.parent, op.data, int(op.delete), now)
                    for op in ops
                ],
            )

    def form_batches(self, name: str, max_ops: int, max_bytes: int) -> int:
        """Groups every unbatched op of ``name``, in enqueue order, into batches of at most
        ``max_ops`` ops and about ``max_bytes`` bytes (a bigger op goes alone), each under the
        ref's next batchSeq and the ref's client id, and fixes that grouping for good. Returns
        how many batches it formed."""
        max_ops = max(1, max_ops)
        with self._tx() as c:
            rows = c.execute(
                "SELECT seq, length(data) + length(CAST(entity_id AS BLOB)) + length(CAST(parent_id AS BLOB)) "
                "FROM ops WHERE ref_name = ? AND batch_seq IS NULL ORDER BY seq",
                (name,),
            ).fetchall()
            if not rows:
                return 0
            ref = c.execute("SELECT next_batch_seq, client_id FROM refs WHERE name = ?", (name,)).fetchone()
            if ref is None:
                raise CapsyncError(f"no ref named {name}", kind="invalid")
            client_id = _client_id(name, ref[1])
            batch_seq = int(ref[0])
            formed = 0
            start = 0
            while start < len(rows):
                end, size = start, 0
                while end < len(rows) and end - start < max_ops and (end == start or size + rows[end][1] <= max_bytes):
                    size += rows[end][1]
                    end += 1
                c.execute(
                    "UPDATE ops SET batch_seq = ? WHERE ref_name = ? AND seq BETWEEN ? AND ? AND batch_seq IS NULL",
                    (batch_seq, name, rows[start][0], rows[end - 1][0]),
                )
                c.execute(
                    "INSERT INTO batches (ref_name, batch_seq, client_id) VALUES (?, ?, ?)",
                    (name, batch_seq, client_id),
                )
                batch_seq += 1
                formed += 1
                start = end
            c.execute("UPDATE refs SET next_batch_seq = ? WHERE name = ?", (batch_seq, name))
            return formed

    def unacked_batches(self, name: str, after: int = 0, limit: int = 1 << 62) -> List[FormedBatch]:
        """Up to ``limit`` formed, unacknowledged batches of ``name`` with batchSeq above
        ``after``, in batchSeq order, each with its ops in order."""
        with self._lock:
            heads = self._conn.execute(
                "SELECT batch_seq, client_id FROM batches WHERE ref_name = ? AND acked = 0 AND batch_seq > ? "
                "ORDER BY batch_seq LIMIT ?",
                (name, after, limit),
            ).fetchall()
            if not heads:
                return []
            rows = self._conn.execute(
                "SELECT batch_seq, op_id, kind, entity_id, parent_id, data, is_delete FROM ops "
                "WHERE ref_name = ? AND batch_seq BETWEEN ? AND ? ORDER BY batch_seq, seq",
                (name, heads[0][0], heads[-1][0]),
            ).fetchall()
        by_batch: Dict[int, List[Op]] = {}
        for batch_seq, op_id, kind, eid, parent, data, is_delete in rows:
            by_batch.setdefault(batch_seq, []).append(
                Op(bytes(op_id), KINDS[kind], eid, parent, bytes(data), bool(is_delete))
            )
        return [FormedBatch(seq, bytes(cid), tuple(by_batch.get(seq, ()))) for seq, cid in heads]

    def record_progress(self, name: str, sent: Sequence[int], acks: Sequence[BatchAck]) -> None:
        """Records, in one transaction, that the ``sent`` batches went out and what ``acks``
        said: each op's outcome (applied/duplicate -> acked, conflict, rejected, with the seq
        and reason), the batch as acked, and the server's cursor."""
        acked_now = {a.batch_seq for a in acks}
        now = _now_ms()
        with self._tx() as c:
            for seq in sent:
                if seq in acked_now:
                    continue
                c.execute(
                    "UPDATE ops SET state = CASE state WHEN 'pending' THEN 'sent' ELSE state END, "
                    "attempts = attempts + 1 WHERE ref_name = ? AND batch_seq = ?",
                    (name, seq),
                )
            for ack in acks:
                attempt = 1 if ack.batch_seq in sent else 0
                for r in ack.results:
                    state = {"applied": "acked", "duplicate": "acked"}.get(r.status, r.status)
                    c.execute(
                        "UPDATE ops SET state = ?, ack_seq = ?, last_error = ?, attempts = attempts + ?, "
                        "acked_at = ? WHERE op_id = ? AND ref_name = ?",
                        (state, r.seq, r.reason, attempt, now, r.op_id, name),
                    )
                c.execute("UPDATE batches SET acked = 1 WHERE ref_name = ? AND batch_seq = ?", (name, ack.batch_seq))
                c.execute(
                    "UPDATE refs SET ack_cursor = max(ack_cursor, ?), state = 'ok', last_error = '' WHERE name = ?",
                    (ack.cursor, name),
                )

    # -- healing a restored server ----------------------------------------------------------

    def note_history(self, name: str, history: str) -> bool:
        """Records the server history id a grant carried. Returns whether it differs from the
        one seen before (never on the first: there is nothing to compare with; nor for an
        empty id, which a server without history ids sends)."""
        with self._tx() as c:
            row = c.execute("SELECT history FROM refs WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise CapsyncError(f"no ref named {name}", kind="invalid")
            seen = str(row[0])
            if not seen and history:
                c.execute("UPDATE refs SET history = ? WHERE name = ?", (history, name))
            return bool(seen) and bool(history) and seen != history

    def heal(self, name: str, new_client_id: bytes, history: Optional[str] = None) -> int:
        """Heals a server that lost acknowledged ops (restored from an older backup), in one
        transaction: every op of ``name`` still kept (acked, sent or pending) goes back to the
        queue, in the order it was made, to be re-batched under ``new_client_id`` from batchSeq
        1 (the server's record of the old client id's batches no longer matches this
        outbox's). The server dedupes by opId, so an op it still has answers ``duplicate`` and
        one it lost is applied: nothing twice. Rejected and conflicting ops are moved out of
        every batch (batch 0, never formed) and stay out of it. ``history`` (if given) becomes
        the ref's. Returns how many acked ops go out again (added to the ref's ``healed``)."""
        if len(new_client_id) != 16:
            raise CapsyncError("a client id is 16 bytes", kind="invalid")
        with self._tx() as c:
            acked = int(
                c.execute("SELECT count(*) FROM ops WHERE ref_name = ? AND state = 'acked'", (name,)).fetchone()[0]
            )
            c.execute(
                "UPDATE ops SET state = 'pending', batch_seq = NULL "
                "WHERE ref_name = ? AND state IN ('acked', 'sent', 'pending')",
                (name,),
            )
            c.execute("UPDATE ops SET batch_seq = 0 WHERE ref_name = ? AND state IN ('rejected', 'conflict')", (name,))
            c.execute("DELETE FROM batches WHERE ref_name = ?", (name,))
            c.execute(
                "UPDATE refs SET client_id = ?, next_batch_seq = 1, healed = healed + ?, "
                "history = coalesce(?, history) WHERE name = ?",
                (bytes(new_client_id), acked, history, name),
            )
            return acked

    def last_acked_batch(self, name: str) -> int:
        """The highest batchSeq of ``name`` the server has acknowledged (0 if none)."""
        rows = self._read("SELECT coalesce(max(batch_seq), 0) FROM batches WHERE ref_name = ? AND acked = 1", (name,))
        return int(rows[0][0])

    def prune_acked(self, name: str, cutoff_ms: int) -> int:
        """Forgets acked ops of ``name`` acknowledged at or before ``cutoff_ms`` (Unix ms):
        they can no longer heal a restored server. Returns how many were removed."""
        with self._tx() as c:
            return c.execute(
                "DELETE FROM ops WHERE ref_name = ? AND state = 'acked' AND acked_at <= ?", (name, cutoff_ms)
            ).rowcount

    def counts(self, name: str) -> OpCounts:
        """How many of the ref's ops are pending, sent, acked, rejected, conflict."""
        rows = self._read("SELECT state, count(*) FROM ops WHERE ref_name = ? GROUP BY state", (name,))
        known = {k: 0 for k in ("pending", "sent", "acked", "rejected", "conflict")}
        for state, n in rows:
            if state in known:
                known[state] = n
        return OpCounts(**known)

    def unacked_count(self, name: str) -> int:
        """Ops of ``name`` not acknowledged yet (pending or sent)."""
        c = self.counts(name)
        return c.pending + c.sent

    def op_state(self, op_id: bytes) -> Optional[Tuple[str, int, str]]:
        """``(state, ack_seq, last_error)`` of an op, by opId."""
        rows = self._read("SELECT state, ack_seq, last_error FROM ops WHERE op_id = ?", (op_id,))
        return (rows[0][0], int(rows[0][1]), rows[0][2]) if rows else None

    def ops(self, name: str) -> List[Tuple[Op, str, Optional[int], int]]:
        """Every op of ``name`` in enqueue order: ``(op, state, batch_seq, ack_seq)``."""
        rows = self._read(
            "SELECT op_id, kind, entity_id, parent_id, data, is_delete, state, batch_seq, ack_seq "
            "FROM ops WHERE ref_name = ? ORDER BY seq",
            (name,),
        )
        return [
            (Op(bytes(r[0]), KINDS[r[1]], r[2], r[3], bytes(r[4]), bool(r[5])), r[6], r[7], int(r[8]))
            for r in rows
        ]

    def batch_seqs(self, name: str) -> List[Tuple[int, bytes, bool]]:
        """Every formed batch of ``name``: ``(batch_seq, client_id, acked)``."""
        rows = self._read(
            "SELECT batch_seq, client_id, acked FROM batches WHERE ref_name = ? ORDER BY batch_seq", (name,)
        )
        return [(int(s), bytes(cid), bool(a)) for s, cid, a in rows]

    # -- replicas ---------------------------------------------------------------------------

    def replica_cursor(self, name: str) -> Optional[Tuple[str, int]]:
        """The replica's ``(session_id, cursor)``, once a snapshot has completed."""
        rows = self._read("SELECT session_id, cursor FROM replica_state WHERE ref_name = ?", (name,))
        return (rows[0][0], int(rows[0][1])) if rows else None

    def apply_snapshot_page(
        self, name: str, session_id: str, first: bool, entities: Sequence[Entity], complete: Optional[int]
    ) -> None:
        """Writes one snapshot page. The first page clears what an interrupted snapshot left;
        the last (``complete`` = the first page's cursor) records the replica's cursor."""
        with self._tx() as c:
            if first:
                c.execute("DELETE FROM replica_entities WHERE ref_name = ?", (name,))
                c.execute("DELETE FROM replica_state WHERE ref_name = ?", (name,))
            for e in entities:
                _upsert(c, name, e, 0)
            if complete is not None:
                c.execute(
                    "INSERT INTO replica_state (ref_name, session_id, cursor) VALUES (?, ?, ?)",
                    (name, session_id, complete),
                )

    def apply_changes(self, name: str, ops: Sequence[AppliedOp]) -> int:
        """Applies logged ops in seq order and advances the cursor in one transaction; ops at
        or below the cursor are skipped. Deleting a message deletes its parts. Returns the
        new cursor."""
        with self._tx() as c:
            row = c.execute("SELECT cursor FROM replica_state WHERE ref_name = ?", (name,)).fetchone()
            if row is None:
                raise CapsyncError(f"ref {name} has no replica yet; pull it first", kind="invalid")
            cursor = int(row[0])
            for applied in ops:
                if applied.seq <= cursor:
                    continue
                op = applied.op
                if op.delete:
                    c.execute(
                        "DELETE FROM replica_entities WHERE ref_name = ? AND kind = ? AND id = ?",
                        (name, _KIND_CODE[op.kind], op.id),
                    )
                    if op.kind == "message":
                        c.execute(
                            "DELETE FROM replica_entities WHERE ref_name = ? AND kind = ? AND parent_id = ?",
                            (name, _KIND_CODE["part"], op.id),
                        )
                else:
                    _upsert(c, name, Entity(op.kind, op.id, op.parent, op.data), applied.seq)
                cursor = applied.seq
            c.execute("UPDATE replica_state SET cursor = ? WHERE ref_name = ?", (cursor, name))
            return cursor

    def replica_history(self, name: str) -> str:
        """The server history id the replica was pulled from (``''`` if unknown or none)."""
        rows = self._read("SELECT history FROM replica_state WHERE ref_name = ?", (name,))
        return str(rows[0][0]) if rows else ""

    def set_replica_history(self, name: str, history: str) -> None:
        """Records the server history id the replica holds (a no-op without a replica)."""
        with self._tx() as c:
            c.execute("UPDATE replica_state SET history = ? WHERE ref_name = ?", (history, name))

    def reset_replica(self, name: str) -> None:
        """Drops the replica of ``name``, so the next pull starts from a snapshot: for a server
        whose seqs no longer mean what the replica applied (restored from a backup)."""
        with self._tx() as c:
            c.execute("DELETE FROM replica_entities WHERE ref_name = ?", (name,))
            c.execute("DELETE FROM replica_state WHERE ref_name = ?", (name,))

    def replica_entities(self, name: str) -> List[Entity]:
        """The replica's entities ordered by (kind, id)."""
        rows = self._read(
            "SELECT kind, id, parent_id, data FROM replica_entities WHERE ref_name = ? ORDER BY kind, id", (name,)
        )
        return [Entity(KINDS[k], i, p, bytes(d)) for k, i, p, d in rows]

    def __iter__(self) -> Iterator[RefRow]:
        return iter(self.refs())


_REF_COLUMNS = "name, uri, state, last_error, session_id, ack_cursor, client_id, history, healed"


def _ref_row(row: Tuple[Any, ...]) -> RefRow:
    name, uri, state, last_error, session_id, ack_cursor, client_id, history, healed = row
    return RefRow(
        name, uri, state, last_error, session_id, int(ack_cursor), _client_id(name, client_id), str(history),
        int(healed),
    )


def _client_id(name: str, value: object) -> bytes:
    """A ref's stored client id, checked: a corrupt id must not silently become another
    client's (all zeroes would be one id shared by every corrupt ref)."""
    client_id = bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else b""
    if len(client_id) != 16:
        raise CapsyncError(
            f"ref {name}'s client id is {len(client_id)} bytes, not 16: the outbox is corrupt", kind="storage"
        )
    return client_id


def _run_script(c: sqlite3.Connection, script: str) -> None:
    """Runs ``;``-separated statements inside the current transaction (``executescript``
    would commit it)."""
    for statement in script.split(";"):
        if statement.strip():
            c.execute(statement)


def _upsert(c: sqlite3.Connection, name: str, e: Entity, seq: int) -> None:
    c.execute(
        "INSERT INTO replica_entities (ref_name, kind, id, parent_id, data, seq) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (ref_name, kind, id) DO UPDATE SET parent_id = excluded.parent_id, data = excluded.data, "
        "seq = excluded.seq",
        (name, _KIND_CODE[e.kind], e.id, e.parent, e.data, seq),
    )


def _create_private(path: str) -> None:
    """Creates ``path`` with mode 0600 if it does not exist (it will hold sturdy URIs)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
