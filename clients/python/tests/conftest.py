"""Fixtures: a real ``capsync serve`` child process, the ``capsync`` CLI, and a TCP delay proxy.

The binary comes from ``$CAPSYNC_BIN``, else ``<repo>/target/debug/capsync`` (this file is
``<repo>/clients/python/tests/conftest.py``). Tests that need a server are skipped, saying why,
when there is no binary. Nothing here prints a token: CLI failures are reported with their
arguments redacted, and URIs are kept as :class:`capsync.SturdyUri` (redacted ``repr``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from capsync import SturdyUri
from capsync.uri import redact_secrets

REPO = Path(__file__).resolve().parents[3]
BIN = Path(os.environ.get("CAPSYNC_BIN") or REPO / "target" / "debug" / "capsync")
START_TIMEOUT = 30.0
CLI_TIMEOUT = 60.0


def need_binary() -> None:
    if not BIN.is_file():
        pytest.skip(f"no capsync binary at {BIN} (build it with `cargo build` or set CAPSYNC_BIN)")


class CliError(AssertionError):
    pass


class ServerExited(AssertionError):
    """``capsync serve`` exited before it listened (e.g. its address was still in use)."""


def run_cli(*args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    """Runs ``capsync ARGS``; on failure raises with the arguments and output redacted."""
    need_binary()
    proc = subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        shown = redact_secrets(" ".join(args))
        raise CliError(f"capsync {shown} exited {proc.returncode}: {redact_secrets(proc.stderr.strip())}")
    return proc


class Server:
    """A ``capsync serve`` child on 127.0.0.1 with its own data dir."""

    def __init__(self, data_dir: Path, extra_args: Sequence[str] = ()) -> None:
        self.data_dir = data_dir
        self.extra_args = list(extra_args)
        self.proc: Optional[subprocess.Popen] = None
        self.address = ""
        self.starts = 0

    @property
    def admin_file(self) -> Path:
        return self.data_dir / "admin.uri"

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def start(self, listen: str = "127.0.0.1:0") -> "Server":
        need_binary()
        self.starts += 1
        log = open(self.data_dir.parent / f"{self.data_dir.name}-serve-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--listen", listen, "--data-dir", str(self.data_dir), *self.extra_args],
            stdout=subprocess.PIPE,
            stderr=log,
        )
        log.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            if not ready:
                self.kill()
                raise AssertionError("capsync serve did not report its address in time")
            chunk = os.read(self.proc.stdout.fileno(), 1)
            if not chunk:
                raise ServerExited(f"capsync serve exited (code {self.proc.wait()}) before listening")
            line += chunk
        match = re.fullmatch(r"capsync listening on (\S+)", line.decode().strip())
        assert match, "unexpected first line from capsync serve"
        self.address = match.group(1)
        stdout = self.proc.stdout
        threading.Thread(target=lambda: [None for _ in iter(lambda: stdout.read(4096), b"")], daemon=True).start()
        return self

    def start_at(self, address: str, timeout: float = 15.0) -> "Server":
        """Starts on the fixed ``address`` (``HOST:PORT``), e.g. a server restored into another
        data dir taking over the address of the one it replaces, so the URIs clients hold keep
        working. Retries while the address is still held by the server that left it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.start(listen=address)
            except ServerExited:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: a crash, no graceful shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM: a graceful shutdown (SIGKILL if it takes over 10 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def admin(self, *args: str, tls_ca: Optional[Path] = None) -> subprocess.CompletedProcess:
        tls = ["--tls-ca", str(tls_ca)] if tls_ca else []
        return run_cli("admin", "--admin-file", str(self.admin_file), *tls, *args)

    def create_session(self, title: str = "test", tls_ca: Optional[Path] = None) -> Tuple[SturdyUri, str]:
        """A new session: its owner URI and its id."""
        proc = self.admin("create-session", "--title", title, tls_ca=tls_ca)
        match = re.search(r"created session (\S+)", proc.stderr)
        assert match, "create-session did not name the session"
        return SturdyUri.parse(proc.stdout.strip()), match.group(1)

    def share(self, uri: SturdyUri, rights: str, label: str) -> Tuple[SturdyUri, str]:
        """A new share of ``uri``: its URI and its id."""
        proc = run_cli("share", uri.expose(), "--rights", rights, "--label", label)
        match = re.search(r"minted share (\S+)", proc.stderr)
        assert match, "share did not name the share"
        return SturdyUri.parse(proc.stdout.strip()), match.group(1)

    def at_current_address(self, uri: SturdyUri) -> SturdyUri:
        return uri.with_address(self.address)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory):
    """One server shared by the tests that do not crash or restart it."""
    need_binary()
    srv = Server(tmp_path_factory.mktemp("shared") / "data").start()
    yield srv
    srv.stop()


@pytest.fixture
def own_server(tmp_path: Path):
    """A server of this test's own, which the test may kill and restart."""
    need_binary()
    srv = Server(tmp_path / "data").start()
    yield srv
    srv.kill()


def backup(data_dir: Path, to: Path) -> None:
    """``capsync backup --data-dir DATA_DIR --to TO`` (the server may be running)."""
    run_cli("backup", "--data-dir", str(data_dir), "--to", str(to))


def restore(backup_file: Path, data_dir: Path) -> None:
    """``capsync restore --from BACKUP --data-dir DATA_DIR`` (a new data dir)."""
    run_cli("restore", "--from", str(backup_file), "--data-dir", str(data_dir))


def cli_pull_json(uri: SturdyUri, outbox: Path) -> Dict:
    """``capsync pull URI --json --outbox OUTBOX``, parsed."""
    proc = run_cli("pull", uri.expose(), "--json", "--outbox", str(outbox))
    return json.loads(proc.stdout)


def write_jsonl(path: Path, ops: Sequence[Dict]) -> Path:
    path.write_text("".join(json.dumps(op) + "\n" for op in ops))
    return path


async def cli_push(uri: SturdyUri, ops_file: Path, outbox: Path) -> asyncio.subprocess.Process:
    """Starts ``capsync push URI --file OPS --outbox OUTBOX`` (the Rust client)."""
    need_binary()
    return await asyncio.create_subprocess_exec(
        str(BIN), "push", uri.expose(), "--file", str(ops_file), "--outbox", str(outbox),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )


class DelayProxy:
    """The TCP delay proxy of ``delay_proxy.py``, in its own process: every chunk is forwarded
    ``delay`` seconds later in each direction (order kept), like the Rust bench's
    ``DelayProxy``; with ``refuse`` set it accepts connections and closes them at once."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("delay_proxy.py")), upstream_host, str(upstream_port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.address = self._reply().split()[1]
        self._delay = 0.0
        self._refuse = False

    def _reply(self) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        assert ready, "the delay proxy did not answer"
        return self.proc.stdout.readline().strip()

    def _command(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        assert self._reply() == "ok"

    @property
    def delay(self) -> float:
        return self._delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        self._command(f"delay {seconds}")
        self._delay = seconds

    @property
    def refuse(self) -> bool:
        return self._refuse

    @refuse.setter
    def refuse(self, on: bool) -> None:
        self._command(f"refuse {int(on)}")
        self._refuse = on

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def delay_proxy(server: Server):
    proxy = DelayProxy(server.host, server.port)
    yield proxy
    proxy.close()


def message_ops(prefix: str, n: int) -> List[Dict]:
    """``n`` JSON Lines puts of messages ``{prefix}{i}``."""
    return [{"op": "put", "kind": "message", "id": f"{prefix}{i}", "data": {"i": i}} for i in range(n)]
