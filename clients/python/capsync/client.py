"""The application API: open an outbox, attach sturdy URIs under names, queue changes, sync,
pull, follow and read status. It mirrors the Rust client (``client/src/api.rs``).

:meth:`Client.put` and :meth:`Client.delete` are synchronous: they only write the outbox, and
the op is durable when they return. The network methods (:meth:`Client.sync`,
:meth:`Client.pull`, :meth:`Client.follow`) are coroutines on pycapnp's asyncio integration.
They start the KJ event loop (``capnp.kj_loop()``) themselves when the caller has not, and
share it when several run at once, so ``asyncio.run(client.sync("work"))`` is enough.

Sync is pipelined as DESIGN §3/§7 asks: ``gateway.redeem(token)`` is sent and, without waiting
for its answer, every unacked batch is sent as ``append`` on the redeem result's ``session``
field (outside any union, so the C++ library can pipeline on it). A reconnect-and-replay costs
one round trip.

The work is split by concern; this module is the facade over them:

- :mod:`capsync.changes`: :class:`Put`, :class:`Delete` and their validation;
- :mod:`capsync.connection`: the schema, the KJ loop, dialing, pipelined redeems, the wire;
- :mod:`capsync.sync`: :class:`SyncOptions`, :class:`SyncReport`, delivering the outbox;
- :mod:`capsync.pull`: pulling and following a session into the local replica.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple, Union

from .changes import MAX_DATA_BYTES, Change, Delete, JsonData, Put, validate
from .connection import kj_loop, load_schema, ref_uri
from .errors import InvalidInputError
from .outbox import Entity, Op, Outbox
from .pull import OnOps, follow_ref, pull_ref, ref_session_id
from .sync import SyncOptions, SyncReport, sync_ref
from .uri import SturdyUri, UriError

__all__ = [
    "Client",
    "SyncOptions",
    "SyncReport",
    "RefStatus",
    "Change",
    "Put",
    "Delete",
    "MAX_DATA_BYTES",
    "load_schema",
    "kj_loop",
]


@dataclass(frozen=True)
class RefStatus:
    """One ref's state. ``uri`` has its token redacted. ``state`` is ``ok``, ``unreachable``,
    ``revoked``, ``expired``, ``unknown-token``, ``denied`` or ``diverged``. ``acked`` counts
    the acked ops still kept (see ``SyncOptions.keep_acked``); ``healed`` how many acked ops
    were re-delivered to a server restored from an older backup."""

    name: str
    uri: str
    session_id: str
    state: str
    pending: int
    sent: int
    acked: int
    rejected: int
    conflict: int
    cursor: int
    last_error: str
    healed: int = 0


class Client:
    """A local-first capsync client over one SQLite file (outbox, refs and replicas).

    >>> client = Client.open("outbox.db")
    >>> client.attach("work", "capsync://127.0.0.1:7420/csy_...")
    >>> client.put("work", "message", "m1", {"role": "user"})   # durable now
    >>> await client.sync("work")                                  # acked now
    """

    def __init__(self, outbox: Outbox, options: Optional[SyncOptions] = None) -> None:
        self.outbox = outbox
        self.options = options or SyncOptions()
        # One lock per (event loop, ref): an asyncio.Lock belongs to the loop it is used on.
        self._sync_locks: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Dict[str, asyncio.Lock]]" = (
            weakref.WeakKeyDictionary()
        )

    @classmethod
    def open(cls, path: "os.PathLike[str] | str", options: Optional[SyncOptions] = None) -> "Client":
        """Opens (or creates, mode 0600) the client database at ``path``."""
        return cls(Outbox(path), options)

    def close(self) -> None:
        """Closes the database."""
        self.outbox.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- local API --------------------------------------------------------------------------

    def attach(self, name: str, uri: Union[str, SturdyUri]) -> None:
        """Attaches a sturdy URI under ``name``, with a client id of the ref's own (16 random
        bytes): the server counts batchSeqs per (client, session), so two names may write to
        one session (an owner URI and a share of it, say) from one outbox.

        Re-attaching a name (a fresh token after a revocation, a server at a new address)
        replaces its URI, clears a refused state and keeps the rest, client id included, as
        the Rust client does: its queued ops and batches are delivered as formed."""
        if not isinstance(name, str) or not name:
            raise InvalidInputError("a ref name is a non-empty string")
        parsed = uri if isinstance(uri, SturdyUri) else SturdyUri.parse(uri)
        self.outbox.attach(name, parsed.expose())

    def enqueue(self, name: str, changes: Iterable[Change]) -> List[bytes]:
        """Queues ``changes`` for ``name`` in one durable transaction and returns their opIds.
        Every change is checked first; if one is invalid, nothing is queued."""
        ops: List[Op] = []
        for i, change in enumerate(changes):
            try:
                ops.append(validate(change))
            except InvalidInputError as exc:
                raise InvalidInputError(f"change {i + 1}: {exc.message}") from None
        if self.outbox.ref(name) is None:
            raise InvalidInputError(f"no ref named {name}; attach it first")
        self.outbox.enqueue(name, ops)
        return [op.op_id for op in ops]

    def put(self, name: str, kind: str, id: str, data: JsonData, parent: str = "") -> bytes:
        """Queues a put of ``(kind, id, parent, data)``; durable when it returns. ``data`` is
        JSON: ``str``/``bytes`` as JSON text, a dict (or list...) is ``json.dumps``-ed.
        Returns the opId (16 bytes, a UUIDv7)."""
        return self.enqueue(name, [Put(kind, id, data, parent)])[0]

    def delete(self, name: str, kind: str, id: str) -> bytes:
        """Queues a delete of ``(kind, id)``; durable when it returns. Returns the opId."""
        return self.enqueue(name, [Delete(kind, id)])[0]

    def status(self) -> List[RefStatus]:
        """Every ref: name, redacted URI, state, op counts, the server's cursor, last error,
        and how many acked ops were re-delivered to a restored server."""
        out = []
        for row in self.outbox.refs():
            try:
                uri = SturdyUri.parse(row.uri).redacted()
            except UriError:
                uri = "<unparsable>"
            c = self.outbox.counts(row.name)
            out.append(
                RefStatus(
                    row.name, uri, row.session_id, row.state, c.pending, c.sent, c.acked, c.rejected, c.conflict,
                    row.ack_cursor, row.last_error, row.healed,
                )
            )
        return out

    def replica(self, name: str) -> Tuple[int, List[Entity]]:
        """The replica of ``name``'s session, ordered by (kind, id), and its cursor."""
        at = self.outbox.replica_cursor(name)
        return (at[1] if at else 0, self.outbox.replica_entities(name))

    # -- network API ------------------------------------------------------------------------

    async def sync(self, name: str) -> SyncReport:
        """Delivers everything queued for ``name`` and returns once it is acknowledged.

        Connects, redeems and replays every unacked batch pipelined (same batches, opIds and
        order as first formed). Acks are recorded per op (applied/duplicate -> acked,
        conflict, rejected). ``capsync/revoked``, ``expired``, ``unknown-token``, ``denied``
        and ``diverged`` stop the ref (state stored, ops kept; later syncs raise at once until
        it is re-attached). Disconnects, ``overloaded``, ``internal`` and ``gap`` are retried
        with backoff up to ``max_attempts`` rounds without progress; then the error is raised
        and the batches stay unacked for the next sync.

        A server restored from an older backup is healed: when the grant's history id differs
        from the one the ref saw before (or a batch is answered ``capsync/gap`` below batches
        the server had acknowledged), every op the ref still keeps (acked ones included) is
        re-queued under a new client id and sent again; the server answers ``duplicate`` for
        what it has and applies what it lost (``SyncReport.healed`` counts the acked ops sent
        again). With nothing queued but acked ops kept, the sync redeems once only to look at
        the history (a failure of that check is not an error of the sync). Afterwards, acked
        ops older than ``SyncOptions.keep_acked`` are pruned.

        Syncs of one ref on this client run one at a time: a second call waits for the first
        to finish, then sends only what is still unacked (often nothing), so no batch is sent
        twice at once. The report counts what this call delivered. Syncs of different refs
        run concurrently.
        """
        ref_uri(self.outbox, name)  # an unknown name raises before a lock is made for it
        async with self._sync_lock(name):
            return await sync_ref(self.outbox, self.options, name)

    def _sync_lock(self, name: str) -> asyncio.Lock:
        """The lock that keeps syncs of ``name`` on the running loop from overlapping."""
        locks = self._sync_locks.setdefault(asyncio.get_running_loop(), {})
        lock = locks.get(name)
        if lock is None:
            lock = locks[name] = asyncio.Lock()
        return lock

    async def session_id(self, name: str) -> str:
        """The id of the session ``name``'s token refers to (the id a ``session`` entity must
        carry). Known after a sync or pull; otherwise learned by redeeming the token."""
        return await ref_session_id(self.outbox, self.options, name)

    async def pull(self, name: str) -> Tuple[int, List[Entity]]:
        """Pulls ``name``'s session into its local replica: the first time a paged snapshot,
        then the ops logged after the first page's cursor (every time after that, only the
        ops after the replica's cursor). A replica pulled from another copy of the server's
        history (a server restored from a backup), or ahead of the server's cursor, is pulled
        again from a snapshot. Returns ``(cursor, entities)``."""
        return await pull_ref(self.outbox, self.options, name)

    async def follow(
        self,
        name: str,
        on_ops: Optional[OnOps] = None,
        *,
        stop: Optional[asyncio.Event] = None,
    ) -> None:
        """Follows ``name``'s session live into its replica until ``stop`` is set (or the task
        is cancelled), across disconnects and server restarts.

        The replica is pulled first if it does not exist (or was pulled from another copy of
        the server's history: a server restored from a backup); then the follower subscribes after
        the replica's cursor with a ``Listener`` whose ``onOps`` applies each run of ops to
        the replica (one transaction) and calls ``on_ops`` (sync or async) *before* returning,
        so a slow consumer slows the server's stream. Each op is delivered once, in seq order.
        After a disconnect, a server shutdown or a gap it resubscribes from the replica's
        cursor (re-reading the ref's URI, so re-attaching a new address takes effect).
        ``onEnd("revoked")``/``("expired")`` or a refused redeem stops the ref and raises
        :class:`CapsyncError` with the marker.
        """
        await follow_ref(self.outbox, self.options, name, on_ops, stop=stop)
