"""The example as a newcomer runs it: the package installed with ``pip install ./clients/python``
(not imported from the checkout), ``examples/record_session.py`` against a running server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, Server, cli_pull_json


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env


def test_the_installed_package_runs_the_example(server: Server, tmp_path: Path) -> None:
    where = subprocess.run(
        [sys.executable, "-c", "import capsync; print(capsync.__file__)"],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60,
    )
    assert where.returncode == 0, f"capsync is not installed in this environment (pip install ./clients/python): {where.stderr}"
    assert Path(REPO / "clients" / "python") not in Path(where.stdout.strip()).parents, "imported from the checkout"

    uri, _ = server.create_session("example")
    outbox = tmp_path / "example-outbox.db"
    run = subprocess.run(
        [sys.executable, str(REPO / "examples" / "record_session.py"), uri.expose(), str(outbox)],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "delivered 4 ops" in run.stdout and "applied=4" in run.stdout, run.stdout
    assert uri.token.expose()[4:16] not in run.stdout + run.stderr, "the example printed part of its token"

    pulled = cli_pull_json(uri, tmp_path / "reader.db")
    ids = sorted(e["id"] for e in pulled["entities"] if e["kind"] != "session")
    assert ids == ["m1", "m1-p1", "m1-p2"]
    assert os.stat(outbox).st_mode & 0o777 == 0o600
