"""The HTTP API end to end: the real service as a subprocess, real sockets on loopback.

What needs a real server: streamed bodies, clients that vanish mid-upload, two clients
at once, raw request paths as they arrive through uvicorn, tokens from the environment
and files, a full disk, and the processor picking up a job queued through the API.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service import TOKEN, Service, wait_for, write_task

pytestmark = pytest.mark.e2e


@pytest.fixture
def api(root: Path) -> Iterator[Service]:
    with Service(root, "--no-processor") as svc:
        yield svc


def raw_request(
    svc: Service, method: str, path: str, body: bytes = b"", token: str | None = TOKEN
) -> tuple[int, dict[str, str], bytes]:
    """A request whose path is sent byte for byte (httpx would normalise `..`)."""
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        if token is not None:
            conn.putheader("X-Api-Token", token)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def hidden(folder: Path) -> list[str]:
    """Hidden leftovers: anything hidden but the lock and the job's history."""
    return sorted(n for n in os.listdir(folder) if n.startswith(".") and n not in HISTORY_OR_LOCK)


HISTORY_OR_LOCK = (".lock", ".events")


def listing(folder: Path) -> list[str]:
    """The names in a job folder but its history (`.events`, written by the service)."""
    return sorted(n for n in os.listdir(folder) if n != ".events")


def chunks(data: bytes, size: int = 1 << 20) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_routes_over_http(api: Service, root: Path) -> None:
    with api.client() as c:
        assert c.get("/").json()["name"] == "batchingest"
        assert c.put("/jobs/j").status_code == 201
        assert c.put("/jobs/j").status_code == 200
        data = os.urandom(20 << 20) + b"tail"
        digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
        r = c.put(
            "/jobs/j/files/deep/er/big.bin",
            content=chunks(data),  # chunked transfer encoding: no Content-Length
            headers={"Content-Digest": f"sha-256=:{digest}:"},
        )
        assert r.status_code == 201, r.text
        assert r.json() == {
            "path": "deep/er/big.bin",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        assert (root / "data" / "j" / "deep" / "er" / "big.bin").read_bytes() == data
        r = c.get("/jobs/j/files/deep/er/big.bin")
        assert r.status_code == 200
        assert r.content == data
        assert r.headers["content-length"] == str(len(data))
        r = c.get("/jobs/j/files/deep/er/big.bin", headers={"Range": "bytes=-4"})
        assert r.status_code == 206 and r.content == b"tail"
        r = c.get("/jobs/j/files/deep/er/big.bin", headers={"Range": "bytes=5000000-5000009"})
        assert r.status_code == 206 and r.content == data[5_000_000:5_000_010]
        r = c.head("/jobs/j/files/deep/er/big.bin")
        assert r.status_code == 200 and r.content == b""
        assert r.headers["content-length"] == str(len(data))
        assert c.get("/jobs/j/files").json() == ["deep"]
        assert c.get("/jobs/j/files/deep").json() == ["er"]
        assert c.get("/jobs").json() == [{"Name": "j", "Status": "ready"}]
        assert c.post("/jobs/j/queue").status_code == 202
        assert c.put("/jobs/j/files/x", content=b"x").status_code == 409
        assert c.delete("/jobs/j").status_code == 204
        assert c.get("/jobs").json() == []
    assert os.listdir(root / "queue") == []


def test_every_response_has_a_request_id(api: Service) -> None:
    cases = [
        ("GET", "/healthz", None, 200),
        ("GET", "/jobs", None, 401),
        ("GET", "/jobs", "wrong", 401),
        ("GET", "/nothing", TOKEN, 404),
        ("DELETE", "/jobs", TOKEN, 405),
        ("GET", "/jobs/none", TOKEN, 404),
        ("GET", "/jobs/..", TOKEN, 400),
    ]
    for method, path, token, status in cases:
        got, headers, body = raw_request(api, method, path, token=token)
        assert got == status, (method, path, got)
        assert len(headers["x-request-id"]) >= 8
        if status >= 400:
            error = json.loads(body)
            assert error["request_id"] == headers["x-request-id"]
            assert error["code"] == headers["x-error-code"]
            assert error["resource"] == path


def test_bearer_token_file_and_logs(root: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# clients\nfile-secret-1\nfile-secret-2\n")
    with Service(
        root,
        "--no-processor",
        "--token-file",
        str(tokens),
        env={"BATCHINGEST_TOKENS": "env-secret"},
    ) as svc:
        for auth in ("Bearer file-secret-1", "Bearer env-secret", "Token file-secret-2"):
            r = httpx.get(svc.url + "/jobs", headers={"Authorization": auth})
            assert r.status_code == 200, auth
        assert httpx.get(svc.url + "/jobs", headers={"X-Api-Token": "file-secret-2"}).is_success
        r = httpx.get(svc.url + "/jobs", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        assert r.json()["code"] == "Unauthorized"
    for secret in ("file-secret-1", "file-secret-2", "env-secret", "nope"):
        assert secret not in svc.log()


def test_generated_token(root: Path) -> None:
    with Service(root, "--no-processor", env={"BATCHINGEST_TOKENS": ""}) as svc:
        token_file = root / ".api-token"
        token = token_file.read_text().strip()
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        assert httpx.get(svc.url + "/jobs").status_code == 401
        assert httpx.get(svc.url + "/jobs", headers={"X-Api-Token": token}).json() == []
    assert str(token_file) in svc.log()
    assert token not in svc.log()


def test_traversal_through_uvicorn(api: Service, root: Path, tmp_path: Path) -> None:
    (tmp_path / "canary").write_text("outside")
    with api.client() as c:
        c.put("/jobs/j")
        c.put("/jobs/j/files/inside", content=b"mine")
    for method in ("GET", "PUT", "DELETE"):
        for path in ("/jobs/..", "/jobs/%2e%2e", "/jobs/../canary", "/jobs/j/files/../../../canary",
                     "/jobs/j/files/%2e%2e/%2e%2e/%2e%2e/canary", "/jobs/j/files/a/%2E%2e/../x",
                     "/jobs/j/files/..%2f..%2f..%2fcanary", "/jobs/j/files/%00",
                     "/jobs/j/files/..%5c..%5ccanary", "/jobs/%2e%2e/files/x"):  # fmt: skip
            status, _, body = raw_request(api, method, path, b"pwned")
            assert status == 400, (method, path, status, body)
            assert json.loads(body)["code"] in ("InvalidPath", "InvalidName")
    assert (tmp_path / "canary").read_text() == "outside"
    assert (root / "data" / "j" / "inside").read_text() == "mine"
    assert sorted(os.listdir(root / "data")) == ["j"]
    assert (root / "tasks").is_dir()


class SlowUpload:
    """An upload over a raw socket that we can pause, finish or abandon."""

    def __init__(self, svc: Service, path: str, total: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", svc.port))
        head = (
            f"PUT {path} HTTP/1.1\r\nHost: x\r\nX-Api-Token: {TOKEN}\r\n"
            f"Content-Length: {total}\r\n\r\n"
        )
        self.sock.sendall(head.encode())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> tuple[int, bytes]:
        self.sock.settimeout(30)
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(
            next(
                line.split(b":")[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
        )
        while len(body) < length:
            body += self.sock.recv(65536)
        return int(head.split()[1]), body

    def close(self) -> None:
        self.sock.close()


def test_dropped_connection_leaves_no_partial_file(api: Service, root: Path) -> None:
    with api.client() as c:
        c.put("/jobs/j")
        c.put("/jobs/j/files/sub/f", content=b"previous")
    folder = root / "data" / "j" / "sub"
    up = SlowUpload(api, "/jobs/j/files/sub/f", 50 << 20)
    up.send(os.urandom(9 << 20))
    wait_for(lambda: hidden(folder), what="the hidden temporary file")
    up.close()
    wait_for(lambda: not hidden(folder), what="the temporary file to be removed")
    assert listing(folder) == ["f"]
    assert (folder / "f").read_bytes() == b"previous"
    # a new file that never completes leaves nothing at all
    up = SlowUpload(api, "/jobs/j/files/sub/new", 1000)
    up.send(b"x" * 10)
    time.sleep(0.2)
    up.close()
    with api.client() as c:
        assert c.get("/jobs/j/files/sub").json() == ["f"]
    wait_for(lambda: listing(folder) == ["f"], what="no trace of the upload")
    # nor do the folders it made for the file
    up = SlowUpload(api, "/jobs/j/files/sub/new/deep/g.txt", 1000)
    up.send(b"x" * 10)
    wait_for(lambda: (folder / "new" / "deep").is_dir(), what="the upload's folders")
    up.close()
    wait_for(lambda: listing(folder) == ["f"], what="no folders left by the upload")
    with api.client() as c:
        assert c.get("/jobs/j/files").json() == ["sub"]
        assert c.get("/jobs/j/files/sub").json() == ["f"]
    assert "Traceback" not in api.log()


def test_job_queued_during_upload_is_409(api: Service, root: Path) -> None:
    with api.client() as c:
        c.put("/jobs/j")
        up = SlowUpload(api, "/jobs/j/files/f", 2 << 20)
        up.send(b"a" * (1 << 20))
        wait_for(lambda: hidden(root / "data" / "j"), what="the upload to start")
        assert c.post("/jobs/j/queue").status_code == 202
        up.send(b"b" * (1 << 20))
        status, body = up.response()
        up.close()
        assert status == 409
        assert json.loads(body)["code"] == "JobBusy"
        assert c.get("/jobs/j/files").json() == []
    assert not hidden(root / "queue" / "j")


def test_concurrent_uploads_of_one_path(api: Service, root: Path) -> None:
    with api.client() as c:
        c.put("/jobs/j")
    bodies = [bytes([65 + i]) * (8 << 20) for i in range(2)]
    results: list[int] = []
    barrier = threading.Barrier(2)

    def upload(data: bytes) -> None:
        def interleaved() -> Iterator[bytes]:
            for i, chunk in enumerate(chunks(data, 256 << 10)):
                if i == 4:
                    barrier.wait(10)  # both are half-way before either finishes
                yield chunk

        with api.client() as c:
            results.append(c.put("/jobs/j/files/same", content=interleaved()).status_code)

    threads = [threading.Thread(target=upload, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [200, 201]
    final = (root / "data" / "j" / "same").read_bytes()
    assert final in bodies
    assert listing(root / "data" / "j") in (["same"], [".lock", "same"])


def test_max_upload_streamed(root: Path) -> None:
    with Service(root, "--no-processor", "--max-upload", "1000000") as svc, svc.client() as c:
        c.put("/jobs/j")
        r = c.put("/jobs/j/files/big", content=chunks(b"x" * 2_000_000, 100_000))
        assert r.status_code == 413
        assert r.json()["code"] == "PayloadTooLarge"
        r = c.put("/jobs/j/files/big2", content=b"x" * 1_000_001)
        assert r.status_code == 413
        r = c.put("/jobs/j/files/new/deep/big", content=chunks(b"x" * 2_000_000, 100_000))
        assert r.status_code == 413
        assert c.put("/jobs/j/files/ok", content=b"x" * 1_000_000).status_code == 201
        assert c.get("/jobs/j/files").json() == ["ok"]
    assert hidden(root / "data" / "j") == []


def test_queued_job_runs_to_success(root: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    write_task(
        root / "tasks",
        "start",
        f'echo "task started in $JOBNAME"\nwhile [ ! -e "{go}" ]; do sleep 0.05; done\n'
        "cat input.txt\nexit 0\n",
    )
    with Service(root) as svc, svc.client() as c:
        assert c.put("/jobs/viaapi").status_code == 201
        assert c.put("/jobs/viaapi/files/input.txt", content=b"payload\n").status_code == 201
        assert c.put("/jobs/viaapi/files/JOB", content=b'{"Todo": ["start"]}').status_code == 201
        assert c.post("/jobs/viaapi/queue").status_code == 202
        wait_for(lambda: c.get("/jobs/viaapi").json()["Status"] == "processing", what="pickup")
        # the LOG of a running job can be followed; its files cannot change
        wait_for(lambda: b"task started in viaapi" in c.get("/jobs/viaapi/files/LOG").content,
                 what="the task's first LOG line")  # fmt: skip
        assert c.put("/jobs/viaapi/files/input.txt", content=b"late").status_code == 409
        assert c.delete("/jobs/viaapi/files/input.txt").status_code == 409
        assert c.delete("/jobs/viaapi").status_code == 409
        assert c.post("/jobs/viaapi/queue").status_code == 200
        go.write_text("")
        wait_for(lambda: c.get("/jobs/viaapi").json()["Status"] == "success", what="success")
        info = c.get("/jobs/viaapi").json()
        assert info["Todo"] == []
        assert len(info["Finished"]) == 1
        assert b"payload" in c.get("/jobs/viaapi/files/LOG").content
        assert (root / "success" / "viaapi" / "input.txt").read_bytes() == b"payload\n"


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)  # fmt: skip
    except FileNotFoundError:
        pytest.skip("no mount command")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_disk_full_leaves_previous_content(tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "small", "2m") as small:
        root = small / "root"
        with Service(root, "--no-processor") as svc, svc.client() as c:
            c.put("/jobs/j")
            assert c.put("/jobs/j/files/f", content=b"previous").status_code == 201
            r = c.put("/jobs/j/files/f", content=chunks(b"x" * (4 << 20), 256 << 10))
            assert r.status_code == 507, r.text
            assert r.json()["code"] == "InsufficientStorage"
            assert c.get("/jobs/j/files/f").content == b"previous"
            assert hidden(root / "data" / "j") == []
            # and the space is free again
            assert c.put("/jobs/j/files/g", content=b"y" * 100_000).status_code == 201


def test_upload_waits_for_a_brief_holder_instead_of_409(api: Service, root: Path) -> None:
    """Uploads of different files to one job commit one at a time under the job's lock;
    one that meets another's commit waits for it rather than failing."""
    import fcntl

    with api.client() as c:
        assert c.put("/jobs/j").status_code == 201
        fd = os.open(root / "data" / "j" / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)  # as another upload committing would
        threading.Timer(0.5, os.close, (fd,)).start()
        t0 = time.monotonic()
        r = c.put("/jobs/j/files/a.txt", content=b"a")
        assert r.status_code == 201, r.text
        assert time.monotonic() - t0 >= 0.4
        assert (root / "data" / "j" / "a.txt").read_bytes() == b"a"
