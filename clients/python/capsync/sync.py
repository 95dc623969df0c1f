"""Delivering a ref's outbox: :class:`SyncOptions`, :class:`SyncReport` and :func:`sync_ref`,
the Rust client's ``client/src/sync.rs``.

A sync groups the ref's unbatched ops into batches (formed once, under the ref's client id and
next batchSeq), then connects and sends ``gateway.redeem(token)`` and every unacked batch as
``append`` on the redeem result's ``session`` without waiting for the redeem: a
reconnect-and-replay costs one round trip. Up to ``window`` batches are in flight; acks are
recorded per op as they arrive.

Healing a server restored from an older backup (README "Backup and restore"): every grant
carries the server's history id, which a restore changes. A round that sees it change (or whose
batch is answered ``capsync/gap`` below a batchSeq the server had acknowledged) re-queues every
op the ref still keeps under a new client id (:meth:`Outbox.heal`) and goes on syncing: the
server answers ``duplicate`` for what it has and applies what it lost. A sync with nothing
queued but acked ops kept redeems once to look at the history. After a sync, acked ops older
than ``keep_acked`` are pruned.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Deque, List, Optional, Tuple

import capnp

from .connection import Connection, awaited, fill_append, kj_loop, quiet, read_ack, ref_uri, wrap
from .errors import GAP, CapsyncError
from .outbox import BatchAck, FormedBatch, Outbox
from .uri import SturdyUri

__all__ = ["DEFAULT_KEEP_ACKED", "SyncOptions", "SyncReport", "backoff", "sync_ref"]

log = logging.getLogger("capsync.sync")

#: Acked ops are kept a week by default (seconds).
DEFAULT_KEEP_ACKED = 7 * 24 * 3600.0


@dataclass
class SyncOptions:
    """How the client batches, pipelines and retries (the Rust ``SyncOptions`` defaults).

    ``on_ack`` is called with each :class:`~capsync.outbox.BatchAck` as it arrives (before it
    is recorded), e.g. for progress displays. ``keep_acked`` (seconds) is how long acked ops
    are kept after their ack, to heal a server restored from an older backup; older ones are
    pruned after each sync.
    """

    window: int = 16
    max_batch_ops: int = 1000
    max_batch_bytes: int = 4 * 1024 * 1024
    max_attempts: int = 5
    backoff_base: float = 0.1
    backoff_max: float = 10.0
    connect_timeout: float = 10.0
    ack_timeout: float = 30.0
    tls_ca: Optional[str] = None
    on_ack: Optional[Callable[[BatchAck], None]] = None
    keep_acked: float = DEFAULT_KEEP_ACKED

    def read_chunk(self) -> int:
        """Unacked batches read from the outbox at a time: enough to fill the window twice."""
        return max(2 * self.window, 32)


def backoff(options: SyncOptions, attempt: int) -> float:
    """Exponential backoff with jitter: ``base * 2**attempt``, capped, times 0.5..1."""
    delay = min(options.backoff_base * (1 << min(attempt, 16)), options.backoff_max)
    return delay * random.uniform(0.5, 1.0)


@dataclass
class SyncReport:
    """What a sync did: batches and ops acknowledged, per status, the server's cursor in the
    last ack (0 if nothing was sent), and ``healed``: acked ops sent again because the server
    had lost them (its history changed, or it answered a gap below batches it had
    acknowledged)."""

    batches: int = 0
    ops: int = 0
    applied: int = 0
    duplicate: int = 0
    conflict: int = 0
    rejected: int = 0
    cursor: int = 0
    healed: int = 0


async def sync_ref(outbox: Outbox, options: SyncOptions, name: str) -> SyncReport:
    """Delivers everything queued for ``name`` and returns once it is acknowledged (see
    :meth:`capsync.Client.sync`, which also keeps two syncs of one ref from overlapping)."""
    uri = ref_uri(outbox, name, for_sync=True)
    row = outbox.ref(name)
    known = [row.session_id if row is not None else ""]
    report = SyncReport()
    failures = 0
    history_checked = False
    # Whether the previous round ended in a gap: a gap in a round whose batches were in flight
    # may be stale (acks of earlier batches arrived after the server judged a later one); only
    # a gap seen again in the next round, which starts from the lowest unacked batch, means the
    # server lost batches it had acknowledged.
    gap_before = False
    async with kj_loop():
        while True:
            batches = await asyncio.to_thread(_next_batches, outbox, options, name)
            if not batches:
                # Nothing queued, but acked ops kept: a server restored meanwhile may lack them.
                kept = 0 if history_checked or report.batches else (await asyncio.to_thread(outbox.counts, name)).acked
                if kept:
                    history_checked = True
                    try:
                        changed = await _history_changed(outbox, options, name, uri)
                    except CapsyncError as err:
                        # Nothing is queued: an unreachable server is no failure of this sync.
                        log.debug("ref %s: could not check the server's history: %s", name, err)
                        changed = None
                    if changed is not None:
                        await _heal(outbox, name, changed, _RESTORED, report)
                        continue
                await asyncio.to_thread(_prune, outbox, options, name)
                return report
            before = report.batches
            try:
                history = await _round(outbox, options, name, uri, batches, report, known)
                gap_before = False
                if history is not None:
                    await _heal(outbox, name, history, _RESTORED, report)
                    continue
                failures = 0
            except CapsyncError as err:
                gap_now = err.marker == GAP
                if gap_now and gap_before and await asyncio.to_thread(_server_is_behind, outbox, name, err):
                    gap_before = False
                    await _heal(outbox, name, None, "the server is behind batches it acknowledged", report)
                    continue
                gap_before = gap_now
                state = err.terminal_state
                if state is not None:
                    await asyncio.to_thread(outbox.set_ref_state, name, state, str(err))
                    raise
                if not err.retryable:
                    raise
                await asyncio.to_thread(outbox.set_ref_state, name, "unreachable", str(err))
                if report.batches == before:
                    failures += 1
                if failures >= options.max_attempts:
                    raise
                await asyncio.sleep(backoff(options, failures))


def _next_batches(outbox: Outbox, options: SyncOptions, name: str) -> List[FormedBatch]:
    """Forms batches of the ref's unbatched ops, then reads the first unacked ones."""
    outbox.form_batches(name, options.max_batch_ops, options.max_batch_bytes)
    return outbox.unacked_batches(name, 0, options.read_chunk())


_RESTORED = "the server's history changed (restored from a backup)"


async def _heal(outbox: Outbox, name: str, history: Optional[str], why: str, report: SyncReport) -> None:
    """Re-queues every op of ``name`` the client still holds under a new client id (see
    :meth:`Outbox.heal`)."""
    healed = await asyncio.to_thread(outbox.heal, name, uuid.uuid4().bytes, history)
    log.warning("ref %s: %s; re-delivering the %d acked ops this client still holds", name, why, healed)
    report.healed += healed


async def _history_changed(outbox: Outbox, options: SyncOptions, name: str, uri: SturdyUri) -> Optional[str]:
    """Redeems the ref's token only to read the server's history id; the new id if it
    changed, else None."""
    conn = await Connection.open(uri, options.tls_ca, options.connect_timeout)
    try:
        _, grant = conn.session(uri)
        try:
            results = await asyncio.wait_for(grant, options.ack_timeout)
        except asyncio.TimeoutError:
            raise CapsyncError("disconnected: no answer to redeem", kind="disconnected") from None
        except capnp.KjException as exc:
            raise wrap(exc) from None
        history = str(results.grant.history)
    finally:
        conn.close()
    changed = await asyncio.to_thread(outbox.note_history, name, history)
    return history if changed else None


_EXPECTED = re.compile(r"next expected is (\d+)")


def _server_is_behind(outbox: Outbox, name: str, err: CapsyncError) -> bool:
    """Whether a ``capsync/gap`` says the server expects a batchSeq at or below one it already
    acknowledged: it lost acknowledged batches (an older copy of its database), and resending
    the unacked ones can never close the gap."""
    match = _EXPECTED.search(err.message)
    return match is not None and int(match.group(1)) <= outbox.last_acked_batch(name)


def _prune(outbox: Outbox, options: SyncOptions, name: str) -> None:
    """Forgets the ref's ops acked longer than ``keep_acked`` ago."""
    cutoff = time.time_ns() // 1_000_000 - int(options.keep_acked * 1000)
    pruned = outbox.prune_acked(name, cutoff)
    if pruned:
        log.debug("ref %s: pruned %d acked ops past the keep time", name, pruned)


async def _round(
    outbox: Outbox,
    options: SyncOptions,
    name: str,
    uri: SturdyUri,
    first: List[FormedBatch],
    report: SyncReport,
    known: List[str],
) -> Optional[str]:
    """One connection's worth of work: redeem and replay pipelined, then everything else
    queued, recording each ack. Returns the server's new history id if the grant names
    another history than the ref saw before (the server was restored: heal it), else None;
    raises what failed on the wire otherwise."""
    window = max(1, options.window)
    chunk = options.read_chunk()
    conn = await Connection.open(uri, options.tls_ca, options.connect_timeout)
    in_flight: Deque[Tuple[FormedBatch, "asyncio.Future[Any]"]] = collections.deque()
    reading: "Optional[asyncio.Future[List[FormedBatch]]]" = None
    recorder = _Recorder(outbox, name)
    queue: Deque[FormedBatch] = collections.deque(first)
    more = len(first) >= chunk
    read_up_to = first[-1].batch_seq if first else 0
    failure: Optional[CapsyncError] = None
    grant: "Optional[asyncio.Future[Any]]" = None
    try:
        try:
            session, grant = conn.session(uri)
            while True:
                while len(in_flight) < window and queue:
                    batch = queue.popleft()
                    request = session.append_request()
                    fill_append(request, batch)
                    reply: "asyncio.Future[Any]" = asyncio.ensure_future(awaited(request.send()))
                    reply.add_done_callback(quiet)
                    in_flight.append((batch, reply))
                    recorder.sent(batch.batch_seq)
                if more and reading is None and len(queue) < window:
                    reading = asyncio.ensure_future(
                        asyncio.to_thread(outbox.unacked_batches, name, read_up_to, chunk)
                    )
                if not in_flight:
                    if reading is None:
                        break
                    fresh = await reading
                    reading = None
                    more = len(fresh) >= chunk
                    if fresh:
                        read_up_to = fresh[-1].batch_seq
                        queue.extend(fresh)
                    continue
                batch, reply = in_flight[0]
                waiting = {reply} if reading is None else {reply, reading}
                done, _ = await asyncio.wait(
                    waiting, timeout=options.ack_timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    raise CapsyncError(f"disconnected: no ack within {options.ack_timeout}s", kind="disconnected")
                if reading is not None and reading in done:
                    fresh = reading.result()
                    reading = None
                    more = len(fresh) >= chunk
                    if fresh:
                        read_up_to = fresh[-1].batch_seq
                        queue.extend(fresh)
                if reply not in done:
                    continue
                in_flight.popleft()
                ack = read_ack(reply.result().ack)
                if (
                    ack.batch_seq != batch.batch_seq
                    or len(ack.results) != len(batch.ops)
                    or any(r.op_id != op.op_id for r, op in zip(ack.results, batch.ops))
                ):
                    raise CapsyncError(f"the server's ack does not match batch {batch.batch_seq}", kind="invalid")
                report.batches += 1
                report.ops += len(batch.ops)
                for r in ack.results:
                    setattr(report, r.status, getattr(report, r.status) + 1)
                report.cursor = ack.cursor
                if options.on_ack is not None:
                    options.on_ack(ack)
                recorder.acked(ack)
        except CapsyncError as err:
            failure = err
        except capnp.KjException as exc:
            failure = wrap(exc)
        except (OSError, EOFError, asyncio.TimeoutError) as exc:
            failure = wrap(exc)
        finally:
            for _, reply in in_flight:
                reply.cancel()
            if reading is not None:
                reading.cancel()
            # Whatever happened on the wire, every ack received is recorded first.
            await recorder.finish()
        # The grant is looked at whatever happened to the batches: on a restored server they
        # may well have failed (a gap), and the history tells why.
        results: Any = None
        if grant is not None:
            try:
                results = await asyncio.wait_for(grant, options.ack_timeout)
            except (capnp.KjException, asyncio.TimeoutError, OSError, EOFError):
                results = None
        if results is not None:
            if await asyncio.to_thread(outbox.note_history, name, str(results.grant.history)):
                return str(results.grant.history)
            session_id = str(results.grant.sessionId)
            if session_id and session_id != known[0]:
                known[0] = session_id
                await asyncio.to_thread(outbox.set_session_id, name, session_id)
        if failure is not None:
            raise failure
        return None
    finally:
        conn.close()


class _Recorder:
    """Records a round's progress (batches sent, acks) in the outbox on a worker thread,
    everything that accumulated in one transaction, so the send window refills at network
    speed instead of at fsync speed."""

    def __init__(self, outbox: Outbox, name: str) -> None:
        self.outbox = outbox
        self.name = name
        self.queue: "asyncio.Queue[Optional[Tuple[str, Any]]]" = asyncio.Queue()
        self.task = asyncio.ensure_future(self._run())

    def sent(self, batch_seq: int) -> None:
        self.queue.put_nowait(("sent", batch_seq))

    def acked(self, ack: BatchAck) -> None:
        self.queue.put_nowait(("acked", ack))

    async def _run(self) -> None:
        done = False
        while not done:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            sent: List[int] = []
            acks: List[BatchAck] = []
            for item in items:
                if item is None:
                    done = True
                elif item[0] == "sent":
                    sent.append(item[1])
                else:
                    acks.append(item[1])
            if sent or acks:
                await asyncio.to_thread(self.outbox.record_progress, self.name, sent, acks)

    async def finish(self) -> None:
        """Records everything queued, then stops; raises if recording failed."""
        self.queue.put_nowait(None)
        await self.task
