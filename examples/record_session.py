#!/usr/bin/env python3
"""Records a tiny agent session through the Python client API: queue changes durably, deliver
them, pull the session back into a local replica, and show the outbox's status. The Python
twin of examples/record_session.rs.

    cargo run --release -- serve &                                   # a server on 127.0.0.1:7420
    URI=$(cargo run --release -- admin create-session --title demo)
    pip install ./clients/python
    python examples/record_session.py "$URI" ./example-outbox-py.db

The URI is a secret: pass it as an argument or in $CAPSYNC_URI; nothing here prints it.
"""

from __future__ import annotations

import asyncio
import os
import sys

try:
    import capsync
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "clients", "python"))
    import capsync

from capsync import CapsyncError, Client, Put


async def record(uri: str, outbox: str) -> None:
    client = Client.open(outbox)
    client.attach("demo", uri)

    # The session entity's id is the session's id, which redeeming the token tells.
    session_id = await client.session_id("demo")

    # One durable transaction: when enqueue returns, a crash loses nothing.
    client.enqueue(
        "demo",
        [
            Put("session", session_id, {"title": "demo", "agent": "record_session.py", "directory": os.getcwd()}),
            Put("message", "m1", {"role": "user"}),
            Put("part", "m1-p1", {"text": "Fix the build"}, parent="m1"),
            Put("part", "m1-p2", {"text": "and run the tests"}, parent="m1"),
        ],
    )

    report = await client.sync("demo")
    print(
        f"delivered {report.ops} ops in {report.batches} batches: applied={report.applied} "
        f"duplicate={report.duplicate} conflict={report.conflict} rejected={report.rejected}; "
        f"server cursor {report.cursor}"
    )
    cursor, entities = await client.pull("demo")
    print(f"replica at cursor {cursor}")
    for e in entities:
        print(f"{e.kind:<8} {e.id:<38} {e.data.decode()}")
    for s in client.status():
        print(
            f"{s.name} {s.state} pending={s.pending} sent={s.sent} acked={s.acked} "
            f"rejected={s.rejected} conflict={s.conflict} cursor={s.cursor} ({s.uri})"
        )
    client.close()


def main() -> int:
    args = sys.argv[1:]
    uri = args[0] if args else os.environ.get("CAPSYNC_URI")
    if not uri:
        print("usage: record_session.py SESSION_URI [OUTBOX_PATH]   (or set CAPSYNC_URI)", file=sys.stderr)
        return 2
    outbox = args[1] if len(args) > 1 else "example-outbox-py.db"
    try:
        asyncio.run(record(uri, outbox))
    except (CapsyncError, capsync.UriError) as err:  # never carries the token
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
