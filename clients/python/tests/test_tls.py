"""``capsyncs://``: the client verifies the server against a CA file (an ssl context built from
it), and refuses a server it cannot verify."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from capsync import CapsyncError, Client, SyncOptions

from conftest import Server, need_binary

OPENSSL_CONFIG = """
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[leaf]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def make_certificates(dir: Path) -> None:
    """A test CA and a server certificate for 127.0.0.1 signed by it (needs `openssl`)."""
    (dir / "openssl.cnf").write_text(OPENSSL_CONFIG)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    steps = [
        ["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=capsync test CA",
         "-config", "openssl.cnf", "-extensions", "ca"],
        ["req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", "-config", "openssl.cnf"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem",
         "-days", "2", "-extfile", "openssl.cnf", "-extensions", "leaf"],
    ]
    for step in steps:
        subprocess.run(["openssl", *step], cwd=dir, check=True, capture_output=True, timeout=30)


@pytest.fixture
def tls_server(tmp_path: Path):
    need_binary()
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    make_certificates(tmp_path)
    srv = Server(tmp_path / "data", ["--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key")])
    srv.start()
    yield srv
    srv.kill()


async def test_sync_and_pull_over_tls_with_a_ca_file(tls_server: Server, tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    owner, _ = tls_server.create_session("tls", tls_ca=ca)
    assert owner.tls
    client = Client.open(tmp_path / "outbox.db", SyncOptions(tls_ca=str(ca)))
    client.attach("t", owner)
    client.put("t", "message", "m1", {"over": "tls"})
    report = await asyncio.wait_for(client.sync("t"), 30)
    assert report.applied == 1
    cursor, entities = await asyncio.wait_for(client.pull("t"), 30)
    assert (cursor, [e.id for e in entities]) == (1, ["m1"])

    # Without the CA the server cannot be verified: a TLS error, not retried, ops kept.
    untrusting = Client.open(tmp_path / "other.db", SyncOptions(max_attempts=1))
    untrusting.attach("t", owner)
    untrusting.put("t", "message", "m2", {})
    with pytest.raises(CapsyncError) as refused:
        await asyncio.wait_for(untrusting.sync("t"), 30)
    assert refused.value.kind == "tls" and not refused.value.retryable
    assert untrusting.status()[0].pending == 1
