"""A small asyncio TCP delay proxy, run as its own process (so that it never competes with the
client under test for the GIL, as the Rust bench's proxy runs on its own runtime).

    python delay_proxy.py UPSTREAM_HOST UPSTREAM_PORT

It prints ``listening HOST:PORT`` and then obeys lines on stdin, answering ``ok`` to each:
``delay SECONDS`` (every chunk is forwarded that much later, in each direction, order kept)
and ``refuse 1`` / ``refuse 0`` (accept connections and close them at once, or proxy them).
It exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Optional, Tuple


class Proxy:
    def __init__(self, upstream: Tuple[str, int]) -> None:
        self.upstream = upstream
        self.delay = 0.0
        self.refuse = False

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.refuse:
            client_w.close()
            return
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(self.pump(client_r, server_w), self.pump(server_r, client_w), return_exceptions=True)

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: "asyncio.Queue[Optional[Tuple[float, bytes]]]" = asyncio.Queue()

        async def send() -> None:
            while True:
                item = await queue.get()
                if item is None:
                    break
                due, chunk = item
                pause = due - loop.time()
                if pause > 0:
                    await asyncio.sleep(pause)
                if writer.is_closing():
                    break
                try:
                    writer.write(chunk)
                    await writer.drain()
                except OSError:
                    break
            writer.close()

        sender = asyncio.ensure_future(send())
        try:
            while True:
                chunk = await reader.read(64 * 1024)
                if not chunk:
                    break
                queue.put_nowait((loop.time() + self.delay, chunk))
        except OSError:
            pass
        queue.put_nowait(None)
        await asyncio.gather(sender, return_exceptions=True)


async def main() -> None:
    proxy = Proxy((sys.argv[1], int(sys.argv[2])))
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening {host}:{port}", flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    while True:
        line = (await stdin.readline()).decode().split()
        if not line:
            break
        if line[0] == "delay":
            proxy.delay = float(line[1])
        elif line[0] == "refuse":
            proxy.refuse = line[1] == "1"
        print("ok", flush=True)
    # stdin closed: drop every proxied connection at once, without asyncio's teardown noise.
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
