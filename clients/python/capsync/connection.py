"""Connections to a capsync server: the shipped schema, pycapnp's KJ event loop, dialing
(TCP or TLS), pipelined redeems, and the wire encoding of batches, acks and ops.

Redeems are pipelined as DESIGN §3/§7 asks: ``gateway.redeem(token)`` is sent and, without
waiting for its answer, calls go out on the redeem result's ``session`` field (outside any
union, so the C++ library can pipeline on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import weakref
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

import capnp

from .errors import CapsyncError, InvalidInputError, RefStoppedError
from .outbox import AppliedOp, BatchAck, Entity, FormedBatch, Op, OpResult, Outbox
from .uri import SturdyUri

__all__ = [
    "load_schema",
    "kj_loop",
    "Connection",
    "ref_uri",
    "fill_append",
    "read_ack",
    "read_entity",
    "read_applied",
    "awaited",
    "quiet",
    "wrap",
]

# -- schema and event loop --------------------------------------------------------------------

_SCHEMA: Any = None


def load_schema() -> Any:
    """The ``capsync.capnp`` module shipped in this package, loaded once.

    Streaming methods (``Listener.onOps -> stream``) need ``/capnp/stream.capnp``, which pycapnp
    ships next to its own module; its parent directory is put on the import path.
    """
    global _SCHEMA
    if _SCHEMA is None:
        here = os.path.dirname(os.path.abspath(__file__))
        capnp_dir = os.path.dirname(os.path.abspath(capnp.__file__))
        _SCHEMA = capnp.load(os.path.join(here, "capsync.capnp"), imports=[os.path.dirname(capnp_dir)])
    return _SCHEMA


# asyncio loop -> [users, the capnp.kj_loop() context manager we entered]
_KJ_USERS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, List[Any]]" = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def kj_loop() -> AsyncIterator[None]:
    """Makes sure pycapnp's KJ event loop runs on the current asyncio loop while the block runs.

    If the application already runs one (``async with capnp.kj_loop():``), it is used as is.
    Otherwise the first user starts it and the last one to leave shuts it down, so concurrent
    syncs and follows share one.
    """
    loop = asyncio.get_running_loop()
    state = _KJ_USERS.get(loop)
    if state is None and hasattr(loop, "_kj_loop"):
        yield  # the application's own kj_loop
        return
    if state is None:
        manager = capnp.kj_loop()
        await manager.__aenter__()
        state = [0, manager]
        _KJ_USERS[loop] = state
    state[0] += 1
    try:
        yield
    finally:
        state[0] -= 1
        if state[0] == 0:
            _KJ_USERS.pop(loop, None)
            await state[1].__aexit__(None, None, None)


def ref_uri(outbox: Outbox, name: str, for_sync: bool = False) -> SturdyUri:
    """The URI attached under ``name``. With ``for_sync``, a ref stopped by a refusal
    (``revoked``, ``expired``...) raises :class:`RefStoppedError` instead, without connecting."""
    row = outbox.ref(name)
    if row is None:
        raise InvalidInputError(f"no ref named {name}")
    if for_sync and row.state not in ("ok", "unreachable"):
        raise RefStoppedError(name, row.state, row.last_error)
    return SturdyUri.parse(row.uri)


# -- wire -------------------------------------------------------------------------------------


def fill_append(request: Any, batch: FormedBatch) -> None:
    """Fills an ``append`` request with ``batch``: its client id, batchSeq and ops in order."""
    b = request.init("batch")
    b.clientId = batch.client_id
    b.batchSeq = batch.batch_seq
    ops = b.init("ops", len(batch.ops))
    for i, op in enumerate(batch.ops):
        out = ops[i]
        out.opId = op.op_id
        if op.delete:
            key = out.init("delete")
            key.kind = op.kind
            key.id = op.id
        else:
            entity = out.init("put")
            entity.kind = op.kind
            entity.id = op.id
            entity.parentId = op.parent
            entity.data = op.data


def read_ack(ack: Any) -> BatchAck:
    """An ``Ack`` as a :class:`BatchAck`."""
    results = tuple(
        OpResult(bytes(r.opId), str(r.status), int(r.seq), str(r.reason)) for r in ack.results
    )
    return BatchAck(int(ack.cursor), int(ack.batchSeq), results)


def read_entity(e: Any) -> Entity:
    """A snapshot ``Entity`` as an :class:`Entity`."""
    return Entity(str(e.kind), str(e.id), str(e.parentId), bytes(e.data))


def read_applied(a: Any) -> AppliedOp:
    """A logged ``AppliedOp`` (changes, subscriptions) as an :class:`AppliedOp`."""
    op = a.op
    op_id = bytes(op.opId)
    if len(op_id) != 16:
        raise CapsyncError("an opId is not 16 bytes", kind="invalid")
    if op.which() == "put":
        e = op.put
        body = Op(op_id, str(e.kind), str(e.id), str(e.parentId), bytes(e.data), False)
    else:
        k = op.delete
        body = Op(op_id, str(k.kind), str(k.id), "", b"", True)
    return AppliedOp(int(a.seq), body)


async def awaited(promise: Any) -> Any:
    """Awaits a pycapnp promise (so ``asyncio.ensure_future`` can wrap it in a task)."""
    return await promise


def quiet(task: "asyncio.Future[Any]") -> None:
    """Marks a task's exception as retrieved (it is reported elsewhere or irrelevant)."""
    if not task.cancelled():
        task.exception()


def wrap(exc: BaseException) -> CapsyncError:
    """``exc`` (a ``KjException``, an ``OSError``...) as a :class:`CapsyncError` with its marker."""
    return CapsyncError.from_exception(exc)


class Connection:
    """One Cap'n Proto connection to a capsync server: the ``Gateway`` and pipelined redeems."""

    def __init__(self, rpc: Any, stream: Any, gateway: Any) -> None:
        self.rpc = rpc
        self.stream = stream
        self.gateway = gateway
        self._closed = False

    @classmethod
    async def open(cls, uri: SturdyUri, tls_ca: Optional[str], timeout: float) -> "Connection":
        """Dials the server of ``uri``: TLS for ``capsyncs://`` (verified against ``tls_ca``, or
        the system roots when None), plain TCP for ``capsync://``."""
        schema = load_schema()
        kwargs: Dict[str, Any] = {}
        if uri.tls:
            try:
                context = ssl.create_default_context(cafile=tls_ca) if tls_ca else ssl.create_default_context()
            except (OSError, ssl.SSLError) as exc:
                raise CapsyncError(f"reading CA certificates: {exc}", kind="invalid") from None
            kwargs = {"ssl": context, "server_hostname": uri.host}
        try:
            stream = await asyncio.wait_for(
                capnp.AsyncIoStream.create_connection(host=uri.host, port=uri.port, **kwargs), timeout
            )
        except asyncio.TimeoutError:
            raise CapsyncError(f"cannot reach {uri.address}: connect timed out", kind="connect") from None
        except ssl.SSLError as exc:
            raise CapsyncError(f"TLS with {uri.address} failed: {exc}", kind="tls") from None
        except OSError as exc:
            raise CapsyncError(f"cannot reach {uri.address}: {exc.strerror or exc}", kind="connect") from None
        rpc = capnp.TwoPartyClient(stream)
        gateway = rpc.bootstrap().cast_as(schema.Gateway)
        return cls(rpc, stream, gateway)

    def session(self, uri: SturdyUri) -> Tuple[Any, "asyncio.Future[Any]"]:
        """A session capability from ``uri``'s token, pipelined: calls on it are sent without
        waiting for the redeem (the result's ``session`` field works for session and share
        tokens alike). The returned future resolves to the redeem's results."""
        promise = self.gateway.redeem(token=uri.token.expose())
        session = promise.session
        grant = asyncio.ensure_future(awaited(promise))
        grant.add_done_callback(quiet)
        return session, grant

    def disconnected(self) -> "asyncio.Future[Any]":
        """Completes when the connection has ended."""
        future: "asyncio.Future[Any]" = asyncio.ensure_future(self.rpc.on_disconnect())
        future.add_done_callback(quiet)
        return future

    def close(self) -> None:
        """Closes the connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for closer in (self.rpc.close, self.stream.close):
            try:
                closer()
            except Exception:
                pass
