"""The HTTP API end to end: the real service as a subprocess, real sockets on loopback.

What needs a real server: streamed bodies, clients that vanish mid-upload, two clients
at once, raw request paths as they arrive through uvicorn, tokens from the environment
and files, a full disk, and the processor picking up a job queued through the API.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
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
from live_service import TOKEN, Service, copies_in_flight, wait_for, write_task

from batchingest.api.upload import sweep_uploads
from batchingest.store import Store

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


HISTORY_OR_LOCK = (".lock", ".events")


def hidden(folder: Path) -> list[str]:
    """Hidden leftovers: anything hidden but the lock and the job's history."""
    return sorted(n for n in os.listdir(folder) if n.startswith(".") and n not in HISTORY_OR_LOCK)


def listing(folder: Path) -> list[str]:
    """The names in a job folder but its history (`.events`, written by the service)."""
    return sorted(n for n in os.listdir(folder) if n != ".events")


def upload_in_flight(job: Path) -> list[str]:
    """An upload's temporary file in a job folder: unnamed (O_TMPFILE, seen as an open
    deleted file in /proc) or a hidden named one."""
    return copies_in_flight(job) + hidden(job)


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
    tokens.chmod(0o640)  # a group may read it (root:ingest), others may not
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


@pytest.mark.parametrize("unnamed", ["1", "0"])
def test_dropped_connection_leaves_no_partial_file(root: Path, unnamed: str) -> None:
    env = {"BATCHINGEST_UPLOAD_UNNAMED": unnamed}
    with Service(root, "--no-processor", env=env) as api, api.client() as c:
        c.put("/jobs/j")
        c.put("/jobs/j/files/sub/f", content=b"previous")
        job = root / "data" / "j"
        folder = job / "sub"
        up = SlowUpload(api, "/jobs/j/files/sub/f", 50 << 20)
        up.send(os.urandom(9 << 20))
        wait_for(lambda: upload_in_flight(job), what="the upload's temporary file")
        assert bool(hidden(job)) == (unnamed == "0")  # unnamed: not even a hidden name
        up.close()
        wait_for(lambda: not upload_in_flight(job), what="the temporary file to be gone")
        assert listing(folder) == ["f"]
        assert (folder / "f").read_bytes() == b"previous"
        # a new file that never completes leaves nothing at all
        up = SlowUpload(api, "/jobs/j/files/sub/new", 1000)
        up.send(b"x" * 10)
        wait_for(lambda: upload_in_flight(job), what="the upload's temporary file")
        up.close()
        assert c.get("/jobs/j/files/sub").json() == ["f"]
        wait_for(lambda: not upload_in_flight(job), what="no trace of the upload")
        # nor folders: they are made when the file is complete, not before
        up = SlowUpload(api, "/jobs/j/files/sub/new/deep/g.txt", 1000)
        up.send(b"x" * 10)
        wait_for(lambda: upload_in_flight(job), what="the upload's temporary file")
        assert not (folder / "new").exists()
        up.close()
        wait_for(lambda: not upload_in_flight(job), what="no trace of the upload")
        assert listing(folder) == ["f"]
        assert c.get("/jobs/j/files").json() == ["sub"]
        assert hidden(job) == []
    assert "Traceback" not in api.log()


def test_job_queued_during_upload_is_409(api: Service, root: Path) -> None:
    with api.client() as c:
        c.put("/jobs/j")
        up = SlowUpload(api, "/jobs/j/files/f", 2 << 20)
        up.send(b"a" * (1 << 20))
        wait_for(lambda: upload_in_flight(root / "data" / "j"), what="the upload to start")
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


@pytest.mark.parametrize("length", [False, True])
def test_disk_full_leaves_previous_content(tmp_path: Path, length: bool) -> None:
    """Chunked, or with a Content-Length (the body read from the socket: after the
    failed write the rest is still read, so the answer comes and the connection goes on)."""
    body = b"x" * (4 << 20)
    with tiny_tmpfs(tmp_path / "small", "2m") as small:
        root = small / "root"
        with Service(root, "--no-processor") as svc, svc.client() as c:
            c.put("/jobs/j")
            assert c.put("/jobs/j/files/f", content=b"previous").status_code == 201
            r = c.put("/jobs/j/files/f", content=body if length else chunks(body, 256 << 10))
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
        # as another upload committing would (a local root: the folder's own lock)
        fd = os.open(root / "data" / "j", os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        threading.Timer(0.5, os.close, (fd,)).start()
        t0 = time.monotonic()
        r = c.put("/jobs/j/files/a.txt", content=b"a")
        assert r.status_code == 201, r.text
        assert time.monotonic() - t0 >= 0.4
        assert (root / "data" / "j" / "a.txt").read_bytes() == b"a"


# -- the trust boundary -------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> None:
    """renameat2(RENAME_EXCHANGE): swap two names atomically, as a local attacker would."""
    if _libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def snapshot(folder: Path) -> dict[str, bytes | None]:
    found: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames:
            found[os.path.relpath(os.path.join(dirpath, name), folder)] = None
        for name in filenames:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, folder)] = Path(path).read_bytes()
    return found


class Swapper(threading.Thread):
    """Swaps a job's real subfolder with a link to an outside folder, over and over."""

    def __init__(self, a: Path, b: Path) -> None:
        super().__init__(daemon=True)
        self.a, self.b = a, b
        self.stop = threading.Event()
        self.swaps = 0

    def run(self) -> None:
        while not self.stop.is_set():
            exchange(self.a, self.b)
            self.swaps += 1


N_VICTIMS = 50


def test_rename_exchange_race_never_escapes(root: Path, tmp_path: Path) -> None:
    """Finding 3: a folder swapped for a link to the outside mid-request (rename exchange)
    made uploads land outside the job, reads return outside files and deletes remove
    them. Uploads, reads, listings and deletes (also recursive) race a swapping thread
    for a few seconds: nothing outside may be written, read, listed or removed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"OUTSIDE")
    (outside / "only-outside").write_bytes(b"")
    for i in range(N_VICTIMS):
        (outside / f"victim-{i}").write_bytes(b"outside victim")
        (outside / f"dir-{i}").mkdir()
        (outside / f"dir-{i}" / "f").write_bytes(b"outside tree")
    before = snapshot(outside)
    with Service(root, "--no-processor") as svc, svc.client() as c:
        assert c.put("/jobs/j").status_code == 201
        job = root / "data" / "j"
        sub = job / "sub"
        sub.mkdir()
        (sub / "secret").write_bytes(b"inside")
        for i in range(N_VICTIMS):
            (sub / f"victim-{i}").write_bytes(b"inside victim")
            (sub / f"dir-{i}").mkdir()
            (sub / f"dir-{i}" / "f").write_bytes(b"inside tree")
        os.symlink(outside, job / "alt")
        try:
            exchange(sub, job / "alt")
        except OSError as e:
            pytest.skip(f"no RENAME_EXCHANGE here: {e}")
        exchange(sub, job / "alt")
        results = race(svc, Swapper(sub, job / "alt"), seconds=4)
        if sub.is_symlink():
            exchange(sub, job / "alt")
    assert snapshot(outside) == before, "something outside the job changed"
    statuses = [status for _, status, _ in results]
    assert len(results) >= 200, len(results)
    assert set(statuses) <= {200, 201, 204, 400, 404, 409}, sorted(set(statuses))
    for op, status, body in results:
        if op == "read" and status == 200:
            assert body == b"inside"
        if op == "list" and status == 200:
            assert b"only-outside" not in body
    ok = {op for op, status, _ in results if status < 300}
    assert ok == set(OPS)
    assert 400 in statuses  # the link was met, and refused
    # every upload that succeeded is in the job (under whichever name the folder had)
    uploaded = {n.decode() for op, status, n in results if op == "upload" and status == 201}
    landed = {p.name for folder in (sub, job / "alt") if not folder.is_symlink()
              for p in folder.iterdir() if p.name.startswith("up-")}  # fmt: skip
    assert uploaded <= landed


OPS = ("upload", "read", "list", "delete", "delete-tree")


def one_request(c: httpx.Client, op: str, n: str, v: int) -> httpx.Response:
    if op == "upload":
        return c.put(f"/jobs/j/files/sub/up-{n}", content=b"up")
    if op == "read":
        return c.get("/jobs/j/files/sub/secret")
    if op == "list":
        return c.get("/jobs/j/files/sub")
    if op == "delete":
        return c.delete(f"/jobs/j/files/sub/victim-{v}")
    return c.delete(f"/jobs/j/files/sub/dir-{v}?recursive=1")


def race(
    svc: Service, swapper: Swapper, seconds: float, at_least: int = 200
) -> list[tuple[str, int, bytes]]:
    """Requests from 4 clients for `seconds`, and on until `at_least` were made (a loaded
    machine serves fewer a second; the count, not the rate, is what the test needs)."""
    results: list[tuple[str, int, bytes]] = []
    deadline = time.monotonic() + seconds
    cap = deadline + 60

    def client(tid: int) -> None:
        with svc.client() as c:
            i = 0
            while time.monotonic() < cap and (
                time.monotonic() < deadline or len(results) < at_least
            ):
                op = OPS[(i + tid) % len(OPS)]
                r = one_request(c, op, f"{tid}-{i}", i % N_VICTIMS)
                body = f"up-{tid}-{i}".encode() if op == "upload" else r.content
                results.append((op, r.status_code, body))
                i += 1

    threads = [threading.Thread(target=client, args=(t,)) for t in range(4)]
    swapper.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 90)
    swapper.stop.set()
    swapper.join(10)
    assert swapper.swaps > 100, swapper.swaps
    return results


@pytest.mark.parametrize("unnamed", ["1", "0"])
def test_killed_upload_leaves_nothing_or_a_swept_temporary(root: Path, unnamed: str) -> None:
    """Finding 7: after kill -9, `.upload-*` temporaries stayed for ever. An unnamed
    temporary vanishes with the process; a named one is removed by sweep_uploads."""
    svc = Service(root, "--no-processor", env={"BATCHINGEST_UPLOAD_UNNAMED": unnamed}).start()
    job = root / "data" / "j"
    try:
        with svc.client() as c:
            c.put("/jobs/j")
            c.put("/jobs/j/files/f", content=b"previous")
        up = SlowUpload(svc, "/jobs/j/files/f", 50 << 20)
        up.send(os.urandom(4 << 20))
        wait_for(lambda: upload_in_flight(job), what="the upload's temporary file")
        if unnamed == "0":
            # a live upload's temporary is never swept
            assert sweep_uploads(Store(root), min_age=0) == 0
            assert hidden(job)
        svc.kill()
        up.close()
    finally:
        svc.stop()
    leftovers = hidden(job)
    if unnamed == "1":
        assert leftovers == []
    else:
        assert leftovers and all(n.startswith(".upload-") for n in leftovers)
    assert sweep_uploads(Store(root), min_age=0) == len(leftovers)
    assert hidden(job) == []
    assert listing(job) in (["f"], [".lock", "f"])
    assert (job / "f").read_bytes() == b"previous"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_exposed_generated_token_is_refused(root: Path, mode: int) -> None:
    """Finding 7: a 0644 ROOT/.api-token was adopted without a word."""
    path = root / ".api-token"
    path.write_text("maybe-leaked-token\n")
    path.chmod(mode)
    svc = Service(root, "--no-processor", env={"BATCHINGEST_TOKENS": ""})
    svc.start(wait=False)
    assert svc.proc is not None
    assert svc.proc.wait(30) == 2
    svc.stop()
    assert f"token file {path} is open to others (mode {mode:04o})" in svc.log()
    assert "chmod 600" in svc.log() and "Traceback" not in svc.log()
    assert "maybe-leaked-token" not in svc.log()
    path.chmod(0o600)
    with Service(root, "--no-processor", env={"BATCHINGEST_TOKENS": ""}) as ok:
        r = httpx.get(ok.url + "/jobs", headers={"X-Api-Token": "maybe-leaked-token"})
        assert r.status_code == 200


def test_token_file_others_may_read_is_refused(root: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("file-secret\n")
    tokens.chmod(0o644)
    svc = Service(root, "--no-processor", "--token-file", str(tokens))
    svc.start(wait=False)
    assert svc.proc is not None
    assert svc.proc.wait(30) == 2
    svc.stop()
    assert f"token file {tokens} is open to others (mode 0644)" in svc.log()
    assert "file-secret" not in svc.log()


def test_the_areas_made_at_first_use_answer_their_first_requests(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    svc = Service(tmp_path / "root", "--no-processor", "--endpoint", f"data={data}")
    with svc, svc.client() as c:
        # the document before any area's request lists every area's operations
        paths = c.get("/openapi.json").json()["paths"]
        assert {"/stuck", "/v1/transfers", "/globus/v0.10/endpoint/{endpoint}"} <= set(paths)
        wrong = c.post("/stuck")
        assert wrong.status_code == 405 and wrong.json()["code"] == "MethodNotAllowed"
        assert c.get("/stuck").json() == {"stuck": []}
        endpoint = c.get("/globus/v0.10/endpoint/data")
        assert endpoint.status_code == 200 and endpoint.json()["DATA_TYPE"] == "endpoint"
        missing = c.get("/globus/v0.10/nothing")
        assert missing.headers["X-Transfer-API-Error"] == "ClientError.NotFound"
        assert c.get("/v1/transfers").json() == []
        assert c.get("/ui/login").status_code == 200
