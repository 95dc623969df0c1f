"""capsync: the Python client of capsync, durable session sync over Cap'n Proto RPC.

Every change is committed to a local SQLite outbox before :meth:`Client.put` /
:meth:`Client.delete` return; :meth:`Client.sync` delivers the queued ops in pipelined batches
(redeem and replay in one round trip) and the server applies each op at most once.

Modules:

- :mod:`capsync.client`: :class:`Client`, the application API (sync, pull, follow, status).
- :mod:`capsync.changes`: :class:`Put` and :class:`Delete`, checked into ops.
- :mod:`capsync.sync`: :class:`SyncOptions`, :class:`SyncReport`, delivering a ref's outbox.
- :mod:`capsync.pull`: pulling and following a session into the local replica.
- :mod:`capsync.connection`: the schema, the KJ event loop, connections, the wire encoding.
- :mod:`capsync.outbox`: the SQLite outbox, refs (each with its own client id), batches and
  replicas.
- :mod:`capsync.uri`: sturdy URIs (``capsync://HOST:PORT/TOKEN``), never printing the token.
- :mod:`capsync.errors`: :class:`CapsyncError` with the server's ``capsync/...`` marker.

The wire schema ships as ``capsync/capsync.capnp`` (see :func:`load_schema`).
"""

from .client import (
    MAX_DATA_BYTES,
    Client,
    Delete,
    Put,
    RefStatus,
    SyncOptions,
    SyncReport,
    kj_loop,
    load_schema,
)
from .errors import CapsyncError, InvalidInputError, RefStoppedError, find_marker
from .outbox import KINDS, AppliedOp, BatchAck, Entity, Op, OpResult, Outbox
from .uri import SturdyUri, Token, UriError, parse_uri

__version__ = "0.1.0"

__all__ = [
    "MAX_DATA_BYTES",
    "KINDS",
    "Client",
    "Put",
    "Delete",
    "RefStatus",
    "SyncOptions",
    "SyncReport",
    "kj_loop",
    "load_schema",
    "CapsyncError",
    "InvalidInputError",
    "RefStoppedError",
    "find_marker",
    "AppliedOp",
    "BatchAck",
    "Entity",
    "Op",
    "OpResult",
    "Outbox",
    "SturdyUri",
    "Token",
    "UriError",
    "parse_uri",
]
