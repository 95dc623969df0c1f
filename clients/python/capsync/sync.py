"""Delivering a ref's outbox: :class:`SyncOptions`, :class:`SyncReport` and :func:`sync_ref`,
the Rust client's ``client/src/sync.rs``.

A sync groups the ref's unbatched ops into batches (formed once, under the ref's client id and
next batchSeq), then connects and sends ``gateway.redeem(token)`` and every unacked batch as
``append`` on the redeem result's ``session`` without waiting for the redeem: a
reconnect-and-replay costs one round trip. Up to ``window`` batches are in flight; acks are
recorded per op as they arrive.
"""

from __future__ import annotations

import asyncio
import collections
import random
from dataclasses import dataclass
from typing import Any, Callable, Deque, List, Optional, Tuple

import capnp

from .connection import Connection, awaited, fill_append, kj_loop, quiet, read_ack, ref_uri, wrap
from .errors import CapsyncError
from .outbox import BatchAck, FormedBatch, Outbox
from .uri import SturdyUri

__all__ = ["SyncOptions", "SyncReport", "backoff", "sync_ref"]


@dataclass
class SyncOptions:
    """How the client batches, pipelines and retries (the Rust ``SyncOptions`` defaults).

    ``on_ack`` is called with each :class:`~capsync.outbox.BatchAck` as it arrives (before it
    is recorded), e.g. for progress displays.
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

    def read_chunk(self) -> int:
        """Unacked batches read from the outbox at a time: enough to fill the window twice."""
        return max(2 * self.window, 32)


def backoff(options: SyncOptions, attempt: int) -> float:
    """Exponential backoff with jitter: ``base * 2**attempt``, capped, times 0.5..1."""
    delay = min(options.backoff_base * (1 << min(attempt, 16)), options.backoff_max)
    return delay * random.uniform(0.5, 1.0)


@dataclass
class SyncReport:
    """What a sync did: batches and ops acknowledged, per status, and the server's cursor in
    the last ack (0 if nothing was sent)."""

    batches: int = 0
    ops: int = 0
    applied: int = 0
    duplicate: int = 0
    conflict: int = 0
    rejected: int = 0
    cursor: int = 0


async def sync_ref(outbox: Outbox, options: SyncOptions, name: str) -> SyncReport:
    """Delivers everything queued for ``name`` and returns once it is acknowledged (see
    :meth:`capsync.Client.sync`, which also keeps two syncs of one ref from overlapping)."""
    uri = ref_uri(outbox, name, for_sync=True)
    row = outbox.ref(name)
    known = [row.session_id if row is not None else ""]
    report = SyncReport()
    failures = 0
    async with kj_loop():
        while True:
            batches = await asyncio.to_thread(_next_batches, outbox, options, name)
            if not batches:
                return report
            before = report.batches
            try:
                await _round(outbox, options, name, uri, batches, report, known)
                failures = 0
            except CapsyncError as err:
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


async def _round(
    outbox: Outbox,
    options: SyncOptions,
    name: str,
    uri: SturdyUri,
    first: List[FormedBatch],
    report: SyncReport,
    known: List[str],
) -> None:
    """One connection's worth of work: redeem and replay pipelined, then everything else
    queued, recording each ack."""
    window = max(1, options.window)
    chunk = options.read_chunk()
    conn = await Connection.open(uri, options.tls_ca, options.connect_timeout)
    in_flight: Deque[Tuple[FormedBatch, "asyncio.Future[Any]"]] = collections.deque()
    reading: "Optional[asyncio.Future[List[FormedBatch]]]" = None
    recorder = _Recorder(outbox, name)
    queue: Deque[FormedBatch] = collections.deque(first)
    more = len(first) >= chunk
    read_up_to = first[-1].batch_seq if first else 0
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
        except CapsyncError:
            raise
        except capnp.KjException as exc:
            raise wrap(exc) from None
        except (OSError, EOFError, asyncio.TimeoutError) as exc:
            raise wrap(exc) from None
        finally:
            for _, reply in in_flight:
                reply.cancel()
            if reading is not None:
                reading.cancel()
            # Whatever happened on the wire, every ack received is recorded first.
            await recorder.finish()
        try:
            results = await asyncio.wait_for(grant, options.ack_timeout)
            session_id = str(results.grant.sessionId)
            if session_id and session_id != known[0]:
                known[0] = session_id
                await asyncio.to_thread(outbox.set_session_id, name, session_id)
        except (capnp.KjException, asyncio.TimeoutError):
            pass
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
