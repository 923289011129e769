"""Upload bodies through the real server's BodyStream (batchingest.connections): curl's
`Expect: 100-continue` and chunked bodies, bodies sent in uneven pieces with pauses, a
wrong Content-Digest on a streamed body, and the connection still usable afterwards."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_service import TOKEN, Service, copies_in_flight

pytestmark = pytest.mark.e2e


@pytest.fixture
def api(root: Path) -> Iterator[Service]:
    with Service(root, "--no-processor") as svc, svc.client() as c:
        assert c.put("/jobs/j").status_code == 201
        yield svc


def digest_of(data: bytes) -> str:
    return "sha-256=:" + base64.b64encode(hashlib.sha256(data).digest()).decode() + ":"


def leftovers(job: Path) -> list[str]:
    """Upload temporaries: unnamed ones still open, or hidden named ones."""
    named = [n for n in os.listdir(job) if n.startswith(".upload-")]
    return copies_in_flight(job) + named


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        assert more, "connection closed before a response"
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(v) for k, _, v in (h.partition(b":") for h in lines[1:])
                  if k.strip().lower() == b"content-length")  # fmt: skip
    while len(body) < length:
        body += sock.recv(65536)
    return int(lines[0].split()[1]), body


def put_head(path: str, length: int, digest: str | None = None) -> bytes:
    extra = f"Content-Digest: {digest}\r\n" if digest else ""
    return (f"PUT {path} HTTP/1.1\r\nHost: x\r\nX-Api-Token: {TOKEN}\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()  # fmt: skip


@pytest.mark.parametrize("chunked", [False, True])
def test_curl_upload(api: Service, root: Path, tmp_path: Path, chunked: bool) -> None:
    """curl -T FILE sends Expect: 100-continue and a Content-Length; -T - a chunked body."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (scripts/test installs it as root on Debian)")
    data = os.urandom((9 << 20) + 77)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    cmd = ["curl", "-sS", "--fail-with-body", "-H", f"X-Api-Token: {TOKEN}",
           "-H", f"Content-Digest: {digest_of(data)}", "-T", "-" if chunked else str(src),
           f"{api.url}/jobs/j/files/in/big.bin"]  # fmt: skip
    with src.open("rb") as stdin:
        done = subprocess.run(cmd, stdin=stdin, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["sha256"] == hashlib.sha256(data).hexdigest()
    assert (root / "data" / "j" / "in" / "big.bin").read_bytes() == data


def test_uneven_pieces_with_pauses(api: Service, root: Path) -> None:
    rng = random.Random(15)
    data = rng.randbytes((3 << 20) + 5)
    with socket.create_connection(("127.0.0.1", api.port), timeout=30) as sock:
        sock.sendall(put_head("/jobs/j/files/f", len(data), digest_of(data)))
        at = 0
        while at < len(data):
            n = rng.choice([1, 7, 1000, 65536, 300_000, 1 << 20])
            sock.sendall(data[at : at + n])
            at += n
            if rng.random() < 0.2:
                time.sleep(0.01)
        status, body = read_response(sock)
    assert status == 201, body
    assert (root / "data" / "j" / "f").read_bytes() == data


def test_wrong_digest_lands_nothing_and_the_connection_goes_on(api: Service, root: Path) -> None:
    job = root / "data" / "j"
    data = os.urandom(8 << 20)
    with socket.create_connection(("127.0.0.1", api.port), timeout=30) as sock:
        sock.sendall(put_head("/jobs/j/files/f", len(data), digest_of(b"something else")))
        sock.sendall(data)
        status, body = read_response(sock)
        assert status == 400
        assert json.loads(body)["code"] == "DigestMismatch"
        # the whole body was read: the next request on this connection is answered
        sock.sendall(put_head("/jobs/j/files/g", 5, digest_of(b"right")) + b"right")
        status, body = read_response(sock)
        assert status == 201, body
    assert sorted(n for n in os.listdir(job) if not n.startswith(".")) == ["g"]
    assert leftovers(job) == []
