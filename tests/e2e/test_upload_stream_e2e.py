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
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
from live_service import TOKEN, Service, copies_in_flight, wait_for

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


def next_response(answers: BinaryIO) -> tuple[int, bytes]:
    status = int(answers.readline().split()[1])
    length = 0
    while (line := answers.readline()) != b"\r\n":
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, answers.read(length)


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


def test_a_request_right_behind_an_upload_is_answered(api: Service, root: Path) -> None:
    """The rest of a Content-Length body is read from the socket, past the HTTP parser;
    a request pipelined right behind it, in the same packets, is still answered."""
    data = os.urandom((6 << 20) + 11)
    get = f"GET /jobs/j/files/f HTTP/1.1\r\nHost: x\r\nX-Api-Token: {TOKEN}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", api.port), timeout=30) as sock:
        sock.sendall(put_head("/jobs/j/files/f", len(data), digest_of(data)) + data + get)
        # both answers may come in one read: split them by their heads' lengths
        with sock.makefile("rb") as answers:
            status, body = next_response(answers)
            assert status == 201, body
            assert json.loads(body)["sha256"] == hashlib.sha256(data).hexdigest()
            status, body = next_response(answers)
    assert status == 200
    assert body == data


def test_client_gone_mid_body_leaves_nothing(api: Service, root: Path) -> None:
    """A client that resets the connection half-way through a body read from the socket:
    no file, no temporary, and the service goes on."""
    job = root / "data" / "j"
    with socket.create_connection(("127.0.0.1", api.port), timeout=30) as sock:
        sock.sendall(put_head("/jobs/j/files/f", 64 << 20) + os.urandom(8 << 20))
        wait_for(lambda: leftovers(job), what="the upload's temporary file")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wait_for(lambda: not leftovers(job), what="the temporary to be gone")
    assert not (job / "f").exists()
    with api.client() as c:
        assert c.put("/jobs/j/files/g", content=b"after").status_code == 201
    assert "Traceback" not in api.log()


@pytest.mark.parametrize("unnamed", ["1", "0"])
def test_stop_during_a_stalled_upload(root: Path, unnamed: str) -> None:
    """SIGTERM while a client sends half a body and waits: the upload is cancelled after
    uvicorn's grace period, the thread reading the socket gives up, the service exits
    in time and leaves no temporary behind."""
    svc = Service(root, "--no-processor", env={"BATCHINGEST_UPLOAD_UNNAMED": unnamed}).start()
    job = root / "data" / "j"
    try:
        with svc.client() as c:
            assert c.put("/jobs/j").status_code == 201
        sock = socket.create_connection(("127.0.0.1", svc.port), timeout=30)
        sock.sendall(put_head("/jobs/j/files/f", 64 << 20) + os.urandom(4 << 20))
        wait_for(lambda: leftovers(job), what="the upload's temporary file")
        t0 = time.monotonic()
        assert svc.stop() == 0
        assert time.monotonic() - t0 < 20
        sock.close()
    finally:
        svc.stop()
    assert leftovers(job) == []
    assert not (job / "f").exists()
    # uvicorn logs the task it cancels once its grace period is over; nothing else
    assert "timeout graceful shutdown exceeded" in svc.log()
    assert "never retrieved" not in svc.log()
