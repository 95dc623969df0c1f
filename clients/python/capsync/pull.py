"""Reading a session into the local replica: :func:`pull_ref` (a paged snapshot, then the
ops logged after it), :func:`follow_ref` (a live subscription, resubscribing after a
disconnect) and :func:`ref_session_id` (redeeming a token to learn its session). The Rust
client's ``client/src/pull.rs`` and ``client/src/follow.rs``.

A replica records the server history id it was pulled from (every grant carries it). A
replica from another copy of the server's history (the server was restored from a backup: its
seqs now mean other ops), or one ahead of the server's cursor, is dropped and pulled again from
a snapshot, by :func:`pull_ref` and by :func:`follow_ref` alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from typing import Any, Awaitable, Callable, List, Optional, Set, Tuple

import capnp

from .connection import Connection, awaited, kj_loop, load_schema, read_applied, read_entity, ref_uri, wrap
from .errors import CapsyncError, InvalidInputError
from .outbox import AppliedOp, Entity, Outbox
from .sync import SyncOptions, backoff
from .uri import SturdyUri

__all__ = ["PAGE", "OnOps", "ref_session_id", "pull_ref", "follow_ref"]

log = logging.getLogger("capsync.pull")

#: Entities per snapshot page and ops per changes page the client asks for.
PAGE = 1000

#: What :func:`follow_ref` calls with each run of ops once they are in the replica.
OnOps = Callable[[List[AppliedOp]], Optional[Awaitable[None]]]


async def ref_session_id(outbox: Outbox, options: SyncOptions, name: str) -> str:
    """The id of the session ``name``'s token refers to (the id a ``session`` entity must
    carry). Known after a sync or pull; otherwise learned by redeeming the token."""
    row = outbox.ref(name)
    if row is None:
        raise InvalidInputError(f"no ref named {name}")
    if row.session_id:
        return row.session_id
    uri = ref_uri(outbox, name)
    async with kj_loop():
        conn = await Connection.open(uri, options.tls_ca, options.connect_timeout)
        try:
            _, grant = conn.session(uri)
            session_id = str((await grant).grant.sessionId)
        except capnp.KjException as exc:
            raise wrap(exc) from None
        finally:
            conn.close()
    await asyncio.to_thread(outbox.set_session_id, name, session_id)
    return session_id


# -- pull -----------------------------------------------------------------------------------


async def pull_ref(outbox: Outbox, options: SyncOptions, name: str) -> Tuple[int, List[Entity]]:
    """Pulls ``name``'s session into its local replica: the first time a paged snapshot,
    then the ops logged after the first page's cursor (every time after that, only the
    ops after the replica's cursor). A replica from another copy of the server's history
    (the server was restored from a backup), or ahead of the server's cursor, is pulled
    again from a snapshot. Returns ``(cursor, entities)``."""
    uri = ref_uri(outbox, name)
    async with kj_loop():
        cursor = await _pull(outbox, options, name, uri)
    return cursor, outbox.replica_entities(name)


async def _pull(outbox: Outbox, options: SyncOptions, name: str, uri: SturdyUri) -> int:
    """Pulls over one connection (the caller runs the KJ loop); returns the new cursor."""
    conn = await Connection.open(uri, options.tls_ca, options.connect_timeout)
    try:
        session, grant = conn.session(uri)
        results = await grant
        session_id = str(results.grant.sessionId)
        history = str(results.grant.history)
        # A replica pulled from another copy of the server's history (it was restored from a
        # backup) holds seqs that now mean other ops: start it over.
        seen = await asyncio.to_thread(outbox.replica_history, name)
        stale = bool(seen) and bool(history) and seen != history
        if stale:
            log.warning("ref %s: the server's history changed: pulling the replica again from a snapshot", name)
            await asyncio.to_thread(outbox.reset_replica, name)
        restarted = stale
        while True:
            at = await asyncio.to_thread(outbox.replica_cursor, name)
            cursor = at[1] if at is not None else await _snapshot(outbox, name, session, session_id)
            cursor, server = await _catch_up(outbox, name, session, cursor)
            if server is None:
                break
            if restarted:
                raise CapsyncError(
                    f"the server's cursor ({server}) is behind a fresh snapshot's ({cursor})", kind="invalid"
                )
            # The server's cursor is below the replica's: it lost ops the replica applied.
            log.warning(
                "ref %s: the server (cursor %d) is behind this replica (cursor %d): pulling it again", name, server,
                cursor,
            )
            await asyncio.to_thread(outbox.reset_replica, name)
            restarted = True
        await asyncio.to_thread(outbox.set_replica_history, name, history)
        return cursor
    except capnp.KjException as exc:
        raise wrap(exc) from None
    finally:
        conn.close()


async def _snapshot(outbox: Outbox, name: str, session: Any, session_id: str) -> int:
    """A fresh replica from snapshot pages; returns the cursor it is at."""
    after: Optional[Tuple[str, str]] = None
    first_cursor: Optional[int] = None
    while True:
        request = session.snapshot_request()
        request.limit = PAGE
        if after is not None:
            key = request.init("startAfter")
            key.kind = after[0]
            key.id = after[1]
        page = await request.send()
        entities = [read_entity(e) for e in page.entities]
        more = bool(page.more)
        first = first_cursor is None
        if first_cursor is None:
            first_cursor = int(page.cursor)
        await asyncio.to_thread(
            outbox.apply_snapshot_page, name, session_id, first, entities, None if more else first_cursor
        )
        if not more:
            return first_cursor
        if not entities:
            raise CapsyncError("the server sent an empty snapshot page with more to come", kind="invalid")
        after = (entities[-1].kind, entities[-1].id)


async def _catch_up(outbox: Outbox, name: str, session: Any, cursor: int) -> Tuple[int, Optional[int]]:
    """Applies the ops logged after ``cursor``, page by page, until there are none. Returns
    the replica's cursor and None when caught up, or the server's cursor as the second item
    if it is below the replica's (the server lost ops the replica applied)."""
    while True:
        page = await session.changes(after=cursor, limit=PAGE)
        if int(page.cursor) < cursor:
            return cursor, int(page.cursor)
        ops = [read_applied(a) for a in page.ops]
        if not ops:
            return cursor, None
        cursor = await asyncio.to_thread(outbox.apply_changes, name, ops)


# -- follow ---------------------------------------------------------------------------------


async def follow_ref(
    outbox: Outbox,
    options: SyncOptions,
    name: str,
    on_ops: Optional[OnOps] = None,
    *,
    stop: Optional[asyncio.Event] = None,
) -> None:
    """Follows ``name``'s session live into its replica until ``stop`` is set (or the task
    is cancelled), across disconnects and server restarts.

    The replica is pulled first if it does not exist (or was pulled from another copy of the
    server's history: a server restored from a backup); then the follower subscribes after
    the replica's cursor with a ``Listener`` whose ``onOps`` applies each run of ops to
    the replica (one transaction) and calls ``on_ops`` (sync or async) *before* returning,
    so a slow consumer slows the server's stream. Each op is delivered once, in seq order.
    After a disconnect, a server shutdown or a gap it resubscribes from the replica's
    cursor (re-reading the ref's URI, so re-attaching a new address takes effect).
    ``onEnd("revoked")``/``("expired")`` or a refused redeem stops the ref and raises
    :class:`CapsyncError` with the marker.
    """
    ref_uri(outbox, name, for_sync=True)
    failures = 0
    stop_wait = asyncio.ensure_future(stop.wait()) if stop is not None else None
    try:
        async with kj_loop():
            while True:
                if stop is not None and stop.is_set():
                    return
                progress = [False]
                attempt = asyncio.ensure_future(_follow_round(outbox, options, name, on_ops, progress))
                waiting = {attempt} if stop_wait is None else {attempt, stop_wait}
                try:
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not attempt.done():
                        attempt.cancel()
                        with contextlib.suppress(BaseException):
                            await attempt
                if stop_wait is not None and stop_wait.done():
                    return
                if progress[0]:
                    failures = 0
                try:
                    reason = attempt.result()
                except CapsyncError as err:
                    state = err.terminal_state
                    if state is not None:
                        await asyncio.to_thread(outbox.set_ref_state, name, state, str(err))
                        raise
                    if not err.retryable:
                        raise
                else:
                    if reason in ("revoked", "expired"):
                        detail = f"capsync/{reason}: the server ended the subscription"
                        await asyncio.to_thread(outbox.set_ref_state, name, reason, detail)
                        raise CapsyncError(detail, marker=f"capsync/{reason}")
                failures += 1
                capped = SyncOptions(backoff_base=options.backoff_base,
                                     backoff_max=min(options.backoff_max, 2.0))
                pause = backoff(capped, min(failures, 8))
                if stop_wait is not None:
                    await asyncio.wait({stop_wait}, timeout=pause)
                else:
                    await asyncio.sleep(pause)
    finally:
        if stop_wait is not None and not stop_wait.done():
            stop_wait.cancel()


async def _follow_round(
    outbox: Outbox,
    options: SyncOptions,
    name: str,
    on_ops: Optional[OnOps],
    progress: List[bool],
) -> str:
    """One subscription; returns the reason the server gave in ``onEnd``, or raises."""
    uri = ref_uri(outbox, name, for_sync=True)
    conn = await Connection.open(uri, options.tls_ca, options.connect_timeout)
    try:
        session, grant = conn.session(uri)
        history = str((await grant).grant.history)
        # A replica from another copy of the server's history (the server was restored from a
        # backup) is pulled again from a snapshot before following.
        at = await asyncio.to_thread(_replica_for, outbox, name, history)
        cursor = at if at is not None else await _pull(outbox, options, name, uri)
    except capnp.KjException as exc:
        conn.close()
        raise wrap(exc) from None
    except BaseException:
        conn.close()
        raise
    loop = asyncio.get_running_loop()
    ended: "asyncio.Future[str]" = loop.create_future()
    failed: "asyncio.Future[None]" = loop.create_future()
    position = [cursor]

    async def deliver(ops: List[AppliedOp]) -> None:
        fresh = [o for o in ops if o.seq > position[0]]
        if not fresh:
            return
        expected = position[0] + 1
        for o in fresh:
            if o.seq != expected:
                error = CapsyncError(
                    f"disconnected: the subscription skipped ops (expected seq {position[0] + 1})",
                    kind="disconnected",
                )
                if not failed.done():
                    failed.set_exception(error)
                raise error
            expected += 1
        position[0] = await asyncio.to_thread(outbox.apply_changes, name, fresh)
        progress[0] = True
        if on_ops is not None:
            try:
                result = on_ops(fresh)
                if inspect.isawaitable(result):
                    await result
            except BaseException as exc:
                if not failed.done():
                    failed.set_exception(exc)
                raise

    listener = _listener_class()(deliver, ended)
    subscription = None
    try:
        disconnected = conn.disconnected()
        subscribing = asyncio.ensure_future(awaited(session.subscribe(after=cursor, listener=listener)))
        done, _ = await asyncio.wait({subscribing, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        if subscribing not in done:
            subscribing.cancel()
            raise CapsyncError("disconnected: the connection closed", kind="disconnected")
        subscription = subscribing.result().subscription
        waits: "Set[asyncio.Future[Any]]" = {ended, failed, disconnected}
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if failed in done:
            failed.result()
        if ended in done:
            return ended.result()
        raise CapsyncError("disconnected: the connection closed", kind="disconnected")
    except capnp.KjException as exc:
        raise wrap(exc) from None
    finally:
        del subscription
        if not failed.done():
            failed.cancel()
        conn.close()


def _replica_for(outbox: Outbox, name: str, history: str) -> Optional[int]:
    """The cursor of ``name``'s replica, after dropping it if it was pulled from another
    history than ``history`` (None then, or if there is none: pull it)."""
    seen = outbox.replica_history(name)
    if seen and history and seen != history:
        log.warning("ref %s: the server's history changed: pulling the replica again from a snapshot", name)
        outbox.reset_replica(name)
    elif not seen and history:
        outbox.set_replica_history(name, history)
    at = outbox.replica_cursor(name)
    return at[1] if at is not None else None


_LISTENER: Any = None


def _listener_class() -> Any:
    """The ``Listener`` server class, built once the schema is loaded."""
    global _LISTENER
    if _LISTENER is None:
        schema = load_schema()

        class Listener(schema.Listener.Server):  # type: ignore[misc, name-defined]
            """Receives a subscription's ops; ``onOps`` returns once they are in the replica."""

            def __init__(self, deliver: Callable[[List[AppliedOp]], Awaitable[None]], ended: "asyncio.Future[str]") -> None:
                self._deliver = deliver
                self._ended = ended

            async def onOps(self, ops: Any, cursor: int, _context: Any, **kwargs: Any) -> None:
                await self._deliver([read_applied(a) for a in ops])

            async def onEnd(self, reason: Any, _context: Any, **kwargs: Any) -> None:
                if not self._ended.done():
                    self._ended.set_result(str(reason))

        _LISTENER = Listener
    return _LISTENER
