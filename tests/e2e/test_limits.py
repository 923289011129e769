"""The service under hostile connections, and its readiness, end to end.

Raw sockets against the real service: half-sent requests, huge headers, idle floods
with a low descriptor limit (prlimit), and GET /readyz. These also pin down the uvicorn
behaviour batchingest.connections builds on, for the uvicorn that is installed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_service import TOKEN, Service, make_job, wait_for, write_task

pytestmark = pytest.mark.e2e


def connect(svc: Service) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", svc.port), timeout=30)
    return s


def read_all(s: socket.socket, timeout: float = 30) -> bytes:
    """Everything the server sends until it closes the connection."""
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def error_of(answer: bytes) -> tuple[int, dict]:  # type: ignore[type-arg]
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def drop(root: Path, name: str) -> None:
    os.rename(make_job(root, name), root / "queue" / name)


def test_a_half_sent_request_is_answered_408_and_closed(root: Path) -> None:
    with Service(root, "--header-timeout", "1") as svc:
        silent = connect(svc)  # sends nothing at all
        half = connect(svc)
        half.sendall(b"GET /jobs HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        # a complete request, then the start of a second one on the same connection
        second = connect(svc)
        second.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHo")
        t0 = time.monotonic()
        for s in (silent, half):
            status, body = error_of(read_all(s))
            assert status == 408 and body["code"] == "RequestTimeout"
        answer = read_all(second)
        assert answer.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in answer
        assert time.monotonic() - t0 < 10


def test_a_huge_header_is_refused_early_and_costs_no_memory(root: Path) -> None:
    with Service(root) as svc:
        assert svc.proc is not None
        before = rss_kib(svc.proc.pid)
        s = connect(svc)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        chunk = b"a" * (1 << 20)
        sent = 0
        try:
            while sent < 96 << 20:
                s.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert sent < 16 << 20, f"the server read {sent} bytes of header"
        grown = rss_kib(svc.proc.pid) - before
        assert grown < 20 << 10, f"RSS grew by {grown} KiB"
        with svc.client() as c:
            assert c.get("/healthz").status_code == 200


def test_a_large_but_allowed_header_is_served(root: Path) -> None:
    with Service(root, "--max-header-size", "256K") as svc, svc.client() as c:
        reply = c.get("/healthz", headers={"X-Big": "a" * (200 << 10)})
        assert reply.status_code == 200


def test_connections_over_the_limit_get_503_and_the_rest_is_served(root: Path) -> None:
    with Service(root, "--max-connections", "5") as svc:
        idle = [connect(svc) for _ in range(5)]
        time.sleep(0.3)
        status, body = error_of(read_all(connect(svc)))
        assert status == 503 and body["code"] == "TooManyConnections"
        assert error_of(read_all(connect(svc)))[0] == 503
        wait_for(lambda: "refusing connections" in svc.log(), 30, what="a log line")
        assert svc.log().count("refusing connections") == 1
        for s in idle:
            s.close()

        wait_for(lambda: _serves(svc), 10, what="a request to be served again")


def test_an_idle_keep_alive_connection_is_closed(root: Path) -> None:
    with Service(root, "--keep-alive", "1") as svc:
        s = connect(svc)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        t0 = time.monotonic()
        answer = read_all(s)
        assert answer.startswith(b"HTTP/1.1 200")
        assert 0.5 < time.monotonic() - t0 < 5


def test_a_flood_of_idle_connections_with_few_descriptors_leaves_jobs_running(
    root: Path,
) -> None:
    """Finding: ~180 half-sent requests exhausted the descriptors and killed processing."""
    write_task(root / "tasks", "start", "echo ran\n")
    nofile = 256
    args = ("--header-timeout", "15")
    with Service(root, *args, prefix=["prlimit", f"--nofile={nofile}", "--"]) as svc:
        assert svc.proc is not None
        assert "--max-connections 256 lowered to" in svc.log()
        flood = []
        for _ in range(2 * nofile):
            s = connect(svc)
            s.sendall(b"GET /jobs HTTP/1.1\r\nHost: x\r\n")  # never finished
            flood.append(s)
        time.sleep(2)  # the service has taken in the whole flood by now
        fds = len(os.listdir(f"/proc/{svc.proc.pid}/fd"))
        assert fds < nofile - 64, f"{fds} descriptors open of {nofile}"
        t0 = time.monotonic()
        drop(root, "during-flood")
        wait_for(lambda: (root / "success" / "during-flood").is_dir(), 30, what="the job")
        assert time.monotonic() - t0 < 12, "the job waited for the flood to time out"
        # serving again once the half-sent requests have timed out, while the flood's
        # sockets are still open on our side
        wait_for(lambda: _serves(svc), 30, what="/healthz")
        drop(root, "after-flood")
        wait_for(lambda: (root / "success" / "after-flood").is_dir(), 30, what="the next job")
        for s in flood:
            s.close()
        assert "Too many open files" not in svc.log()


def _serves(svc: Service) -> bool:
    try:
        return httpx.get(svc.url + "/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


# -- readiness ----------------------------------------------------------------------


def test_readyz_needs_no_token_and_fails_below_min_free(root: Path) -> None:
    with Service(root, "--min-free", "1M") as svc:
        reply = httpx.get(svc.url + "/readyz")
        assert reply.status_code == 200 and reply.json() == {"status": "ready"}
        assert httpx.get(svc.url + "/healthz").status_code == 200
    with Service(root, "--min-free", "1000000T") as svc:
        reply = httpx.get(svc.url + "/readyz")
        assert reply.status_code == 503 and reply.json()["code"] == "NotReady"
        assert "min-free" not in reply.text  # no details for anonymous callers
        wait_for(lambda: "below --min-free" in svc.log(), 30, what="the reason in the log")
        assert httpx.get(svc.url + "/healthz").status_code == 200  # alive all the same


@pytest.fixture
def chattr(root: Path) -> Iterator[None]:
    probe = subprocess.run(["chattr", "-i", str(root)], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("chattr is not available here")
    yield
    subprocess.run(["chattr", "-i", str(root)], check=True)


def test_readyz_fails_while_the_root_is_not_writable(root: Path, chattr: None) -> None:
    with Service(root, "--min-free", "0") as svc:
        assert httpx.get(svc.url + "/readyz").status_code == 200
        subprocess.run(["chattr", "+i", str(root)], check=True)
        wait_for(lambda: httpx.get(svc.url + "/readyz").status_code == 503, 10, what="not ready")
        assert "is not writable" in svc.log()
        subprocess.run(["chattr", "-i", str(root)], check=True)
        wait_for(lambda: httpx.get(svc.url + "/readyz").status_code == 200, 10, what="ready")


# -- stopping with the API running -------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_with_the_api_running_requeues_and_exits_0(root: Path, sig: int) -> None:
    write_task(root / "tasks", "start", "echo started; sleep 30\n")
    svc = Service(root, "--grace", "1").start()
    try:
        drop(root, "long")
        wait_for(lambda: (root / "processing" / "long" / "LOG").is_file(), 20, what="the task")
        wait_for(lambda: "started" in (root / "processing" / "long" / "LOG").read_text(), 10)
        svc.signal(sig)
        assert svc.proc is not None
        assert svc.proc.wait(30) == 0
    finally:
        svc.stop()
    assert (root / "queue" / "long").is_dir()
    assert "service stopping" in (root / "queue" / "long" / "LOG").read_text()
    assert "stopped" in svc.log()


def _stalled_upload(svc: Service, framing: bytes, first: bytes) -> socket.socket:
    s = connect(svc)
    s.sendall(
        b"PUT /jobs/slow/files/big.bin HTTP/1.1\r\nHost: x\r\n"
        + f"X-Api-Token: {TOKEN}\r\n".encode()
        + framing
        + b"\r\n"
        + first
    )
    return s


def test_an_upload_whose_body_stalls_is_dropped_and_closed(root: Path) -> None:
    """A client that stops sending mid-body: after --body-timeout its connection is
    closed and nothing of the upload is kept (a Content-Length body, read from the
    socket by a thread, and a chunked one, read through the server)."""
    with Service(root, "--body-timeout", "1") as svc:
        with svc.client() as c:
            assert c.put("/jobs/slow").status_code in (200, 201)
        length = _stalled_upload(svc, b"Content-Length: 1000000\r\n", b"x" * 70000)
        chunked = _stalled_upload(
            svc, b"Transfer-Encoding: chunked\r\n", b"10000\r\n" + b"y" * 0x10000 + b"\r\n"
        )
        t0 = time.monotonic()
        for s in (length, chunked):
            assert b"HTTP/1.1 2" not in read_all(s)  # closed, never answered a success
        assert time.monotonic() - t0 < 20
        with svc.client() as c:
            assert c.get("/jobs/slow/files/big.bin").status_code == 404
            assert c.get("/healthz").status_code == 200
        assert "big.bin" not in os.listdir(root / "data" / "slow")
        assert svc.log().count("stalled past --body-timeout") == 2


def test_a_slow_but_steady_upload_is_not_cut(root: Path) -> None:
    with Service(root, "--body-timeout", "1") as svc:
        with svc.client() as c:
            assert c.put("/jobs/slow").status_code in (200, 201)
        s = _stalled_upload(svc, b"Content-Length: 12\r\n", b"")
        for _ in range(6):  # 3 s in all, never 1 s without a byte
            s.sendall(b"ab")
            time.sleep(0.5)
        s.settimeout(10)
        answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 20"), answer[:200]
        with svc.client() as c:
            assert c.get("/jobs/slow/files/big.bin").content == b"ab" * 6
