"""DTS staging end to end: the real service, real HTTP, real copies."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_service import TOKEN, Service, copies_in_flight, wait_for, write_task
from modes import unprivileged

from batchingest.staging import TEMP_PREFIX


class Setup:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "root"
        self.archive = base / "archive"
        self.staging = base / "staging"
        self.archive.mkdir(parents=True)
        self.staging.mkdir()

    def add(self, rel: str, data: bytes) -> Path:
        path = self.archive / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def args(self, *more: str) -> tuple[str, ...]:
        return ("--archive", str(self.archive), "--staging", str(self.staging), *more)

    def temps(self) -> list[Path]:
        return [p for p in self.staging.rglob("*") if p.name.startswith(TEMP_PREFIX)]

    def in_flight(self) -> list[str]:
        return copies_in_flight(self.staging)

    def jobs(self) -> list[str]:
        return sorted(
            p.name
            for state in ("data", "queue", "processing", "success", "error")
            for p in (self.root / state).glob("*")
            if not p.name.startswith(".")
        )


def status(client: httpx.Client, rid: str) -> dict[str, Any]:
    r = client.get("/dts/staging", params={"id": rid})
    assert r.status_code == 200, r.text
    return dict(r.json())


def wait_status(client: httpx.Client, rid: str, want: str, timeout: float = 60) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        s = status(client, rid)
        assert s["status"] in ("staging", want), s
        return s if s["status"] == want else None

    return dict(wait_for(check, timeout=timeout, interval=0.05, what=f"status {want}"))


def post(client: httpx.Client, ids: list[str], **kw: Any) -> httpx.Response:
    return client.post("/dts/staging", json={"ids": ids}, **kw)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Setup, Service]]:
    setup = Setup(tmp_path_factory.mktemp("staging"))
    with Service(setup.root, *setup.args()) as svc:
        yield setup, svc


def test_request_poll_ready_bytes_identical(shared: tuple[Setup, Service]) -> None:
    setup, svc = shared
    ids = [f"proj1/reads/r{i}.fastq" for i in range(30)] + ["proj1/top.txt"]
    for i, rel in enumerate(ids):
        setup.add(rel, os.urandom(5000 + i))
    # the DTS sends `Authorization: Token <token>`
    with httpx.Client(base_url=svc.url, headers={"Authorization": f"Token {TOKEN}"}) as c:
        r = post(c, [*ids, ids[0]])  # a duplicate is staged once
        assert r.status_code == 201, r.text
        rid = r.json()["request_id"]
        assert uuid.UUID(rid).version == 4 and str(uuid.UUID(rid)) == rid
        first = status(c, rid)
        assert first["files_total"] == 31
        assert first["bytes_total"] == sum(5000 + i for i in range(31))
        done = wait_status(c, rid, "ready")
        total = first["bytes_total"]
        assert done == {"status": "ready", "files_total": 31, "files_staged": 31,
                        "bytes_total": total, "bytes_staged": total}  # fmt: skip
        assert c.get(f"/dts/staging/{rid}").json() == done
        assert c.get(f"/dts/staging/{rid.upper()}").json() == done
        job = c.get(f"/jobs/{rid}")
        assert job.status_code == 200 and job.json()["Status"] == "success"
    for rel in ids:
        assert (setup.staging / rel).read_bytes() == (setup.archive / rel).read_bytes()
        assert (setup.staging / rel).stat().st_mtime_ns == (setup.archive / rel).stat().st_mtime_ns
    assert setup.temps() == []
    log = (setup.root / "success" / rid / "LOG").read_text()
    assert "copied proj1/top.txt " in log


def test_already_staged_file_is_not_copied_again(shared: tuple[Setup, Service]) -> None:
    setup, svc = shared
    setup.add("again/a.bin", os.urandom(100_000))
    with svc.client() as c:
        rid1 = post(c, ["again/a.bin"]).json()["request_id"]
        wait_status(c, rid1, "ready")
        before = (setup.staging / "again" / "a.bin").stat()
        rid2 = post(c, ["again/a.bin"]).json()["request_id"]
        assert rid2 != rid1
        wait_status(c, rid2, "ready")
    after = (setup.staging / "again" / "a.bin").stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_ctime_ns) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_ctime_ns,
    )
    assert "already staged again/a.bin" in (setup.root / "success" / rid2 / "LOG").read_text()


def test_unknown_ids_are_listed_and_nothing_is_created(shared: tuple[Setup, Service]) -> None:
    setup, svc = shared
    setup.add("known/k.txt", b"k")
    before = setup.jobs()
    with svc.client() as c:
        r = post(c, ["known/k.txt", "missing/one", "known", "missing/two"])
    assert r.status_code == 404, r.text
    body = r.json()
    assert body["code"] == "FilesNotFound"
    assert body["unresolved"] == ["missing/one", "known", "missing/two"]
    assert setup.jobs() == before


@pytest.mark.parametrize(
    "bad", ["../archive/known/k.txt", "/etc/passwd", "known/../known/k.txt", ".hidden"]
)
def test_paths_leaving_the_archive_are_rejected(shared: tuple[Setup, Service], bad: str) -> None:
    setup, svc = shared
    setup.add("known/k.txt", b"k")
    before = setup.jobs()
    with svc.client() as c:
        r = post(c, ["known/k.txt", bad])
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "InvalidId" and r.json()["invalid"] == [bad]
    assert setup.jobs() == before


def test_every_malformed_body_is_a_400(shared: tuple[Setup, Service]) -> None:
    setup, svc = shared
    before = setup.jobs()
    bodies: list[bytes] = [
        b"", b"not json", b"{", b"[]", b'"ids"', b"null", b"{}", b'{"id": ["a"]}',
        b'{"ids": "a"}', b'{"ids": []}', b'{"ids": [""]}', b'{"ids": [1]}', b'{"ids": [null]}',
        b'{"ids": [["a"]]}', b'{"ids": {"a": 1}}', b"\xff\xfe",
    ]  # fmt: skip
    with svc.client() as c:
        for body in bodies:
            r = c.post("/dts/staging", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (body, r.text)
            assert r.json()["code"] == "InvalidRequest" and r.json()["message"]
        too_many = post(c, [f"f{i}" for i in range(10_001)])
        assert too_many.status_code == 400 and "at most 10000" in too_many.json()["message"]
        assert post(c, ["x"], headers={"X-Api-Token": "wrong"}).status_code == 401
    assert setup.jobs() == before


def test_status_of_missing_or_garbage_ids(shared: tuple[Setup, Service]) -> None:
    _, svc = shared
    with svc.client() as c:
        assert c.get("/dts/staging").status_code == 400
        assert c.get("/dts/staging", params={"id": ""}).status_code == 400
        for garbage in ("nope", "../../etc", "1234", "4b86e181-8c83-447e-aada"):
            r = c.get("/dts/staging", params={"id": garbage})
            assert r.status_code == 400 and r.json()["code"] == "InvalidRequestId", r.text
        assert c.get("/dts/staging/not-a-uuid").status_code == 400
        missing = str(uuid.uuid4())
        r = c.get("/dts/staging", params={"id": missing})
        assert r.status_code == 404 and r.json()["code"] == "StagingRequestNotFound"
        assert c.get(f"/dts/staging/{missing}").status_code == 404


def test_idempotency_key_returns_the_same_request(shared: tuple[Setup, Service]) -> None:
    setup, svc = shared
    setup.add("idem/i.txt", b"i")
    setup.add("idem/j.txt", b"j")
    key = {"Idempotency-Key": f"key-{uuid.uuid4()}"}
    with svc.client() as c:
        r1 = post(c, ["idem/i.txt"], headers=key)
        jobs_after_first = setup.jobs()
        r2 = post(c, ["idem/i.txt"], headers=key)
        assert r1.status_code == r2.status_code == 201
        assert r1.json()["request_id"] == r2.json()["request_id"]
        assert setup.jobs() == jobs_after_first
        assert post(c, ["idem/j.txt"], headers=key).status_code == 422
        other = post(c, ["idem/i.txt"], headers={"Idempotency-Key": f"other-{uuid.uuid4()}"})
        assert other.json()["request_id"] != r1.json()["request_id"]
        wait_status(c, r1.json()["request_id"], "ready")
    # kept in a hidden service folder, never as a job
    assert any((setup.root / ".idempotency").iterdir())


def test_openapi_lists_the_staging_routes(shared: tuple[Setup, Service]) -> None:
    _, svc = shared
    with svc.client() as c:
        spec = c.get("/openapi.json").json()
    paths = spec["paths"]
    assert "post" in paths["/dts/staging"] and "get" in paths["/dts/staging/{id}"]
    post_errors = paths["/dts/staging"]["post"]["responses"]
    assert "FilesNotFound" in post_errors["404"]["description"]
    assert "RequestTooLarge" in post_errors["413"]["description"]
    codes = spec["components"]["schemas"]["Error"]["properties"]["code"]["enum"]
    assert {"InvalidRequest", "StagingRequestNotFound", "StagingNotConfigured"} <= set(codes)


def test_hostile_bodies_are_400_or_413_and_create_nothing(shared: tuple[Setup, Service]) -> None:
    setup, svc = shared
    before = setup.jobs()
    deep = b"[" * 100_000 + b"]" * 100_000
    with svc.client() as c:
        for body, message in [
            (deep, "Expected `object`, got `array`"),
            (b'{"ids": ' + deep + b"}", "Expected `str`, got `array` - at `$.ids[0]`"),
            (b'{"x": ' + deep + b', "ids": ["a"]}', "nested too deeply"),
            (b'{"ids": ["ok", "\\ud800"]}', "not valid JSON"),
            (b'{"ids": [' + b"1" * 5000 + b"]}", "at `$.ids[0]`"),
        ]:
            r = c.post("/dts/staging", content=body)
            assert r.status_code == 400, (body[:30], r.text)
            assert r.json()["code"] == "InvalidRequest" and message in r.json()["message"]
        limit = 10_000 * 4200  # max(1 MiB, staging-max-ids x 4200)
        declared = c.post("/dts/staging", content=b" " * (limit + 1))
        streamed = c.post(
            "/dts/staging", content=iter([b" " * (1 << 20)] * (limit // (1 << 20) + 1))
        )
        for r in (declared, streamed):
            assert r.status_code == 413 and r.json()["code"] == "RequestTooLarge", r.text
        assert c.get("/healthz").status_code == 200
    assert "Traceback" not in svc.log()
    assert setup.jobs() == before


def test_status_with_a_fifo_for_progress_or_log_answers_at_once(
    shared: tuple[Setup, Service],
) -> None:
    """Job folders arrive by `cp -r` too: a named pipe there must not hang the API."""
    setup, svc = shared
    setup.add("fifo/f.txt", b"f")
    with svc.client() as c:
        c.timeout = httpx.Timeout(5)  # a hanging read would show as a timeout
        rid = post(c, ["fifo/f.txt"]).json()["request_id"]
        wait_status(c, rid, "ready")
        job = setup.root / "success" / rid
        (job / "PROGRESS.json").unlink()
        os.mkfifo(job / "PROGRESS.json")
        ready = c.get(f"/dts/staging/{rid}")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        os.rename(job, setup.root / "error" / rid)  # as an operator might
        (setup.root / "error" / rid / "LOG").unlink()
        os.mkfifo(setup.root / "error" / rid / "LOG")
        failed = c.get(f"/dts/staging/{rid}").json()
        assert failed["status"] == "failed"
        assert "PROGRESS.json cannot be read: not a regular file (named pipe)" in failed["message"]
        assert c.get("/jobs").status_code == 200


# -- with their own service -------------------------------------------------------------------


def test_catalog_ids_reloaded_when_the_catalog_changes(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.add("proj/x.fastq", b"x" * 100)
    setup.add("proj/y.fastq", b"y" * 200)
    catalog = tmp_path / "catalog.tsv"
    catalog.write_text("615a383dcc4ff44f36ca5ba2\tproj/x.fastq\n")
    with Service(setup.root, *setup.args("--catalog", str(catalog))) as svc, svc.client() as c:
        r = post(c, ["615a383dcc4ff44f36ca5ba2"])
        assert r.status_code == 201, r.text
        wait_status(c, r.json()["request_id"], "ready")
        assert (setup.staging / "proj" / "x.fastq").read_bytes() == b"x" * 100
        # paths are not ids when a catalog is used
        r = post(c, ["proj/y.fastq", "61412246cc4ff44f36c8913f"])
        assert r.status_code == 404
        assert r.json()["unresolved"] == ["proj/y.fastq", "61412246cc4ff44f36c8913f"]

        catalog.write_text(catalog.read_text() + "61412246cc4ff44f36c8913f\tproj/y.fastq\n")
        r = post(c, ["61412246cc4ff44f36c8913f"])
        assert r.status_code == 201, r.text
        wait_status(c, r.json()["request_id"], "ready")
    assert (setup.staging / "proj" / "y.fastq").read_bytes() == b"y" * 200


def test_hand_made_job_cannot_stage_what_the_catalog_does_not_list(tmp_path: Path) -> None:
    """With a catalog, uploading one's own MANIFEST.json stages only catalog ids."""
    setup = Setup(tmp_path)
    setup.add("public/p.txt", b"public")
    setup.add("private/secret.txt", b"secret")
    catalog = tmp_path / "catalog.tsv"
    catalog.write_text("id-public\tpublic/p.txt\n")
    rid = str(uuid.uuid4())
    secret = {"id": "private/secret.txt", "path": "private/secret.txt", "size": 6}
    lying = {"id": "id-public", "path": "private/secret.txt", "size": 6}  # a catalog id
    manifest = {"files": [secret, lying]}
    with Service(setup.root, *setup.args("--catalog", str(catalog))) as svc, svc.client() as c:
        assert c.put(f"/jobs/{rid}").status_code == 201
        for name, content in (("MANIFEST.json", manifest), ("JOB", {"Todo": ["stage"]})):
            r = c.put(f"/jobs/{rid}/files/{name}", content=json.dumps(content).encode())
            assert r.status_code == 201, r.text
        assert c.post(f"/jobs/{rid}/queue").status_code == 202
        failed = wait_status(c, rid, "failed")
        assert failed["message"] == "id 'private/secret.txt': not in the catalog"
        log = c.get(f"/jobs/{rid}/files/LOG").text
    assert "copied public/p.txt " in log
    assert not (setup.staging / "private").exists()
    assert (setup.staging / "public" / "p.txt").read_bytes() == b"public"


def test_not_configured_answers_503(tmp_path: Path) -> None:
    with Service(tmp_path / "root") as svc, svc.client() as c:
        for r in (post(c, ["a"]), c.get("/dts/staging", params={"id": str(uuid.uuid4())})):
            assert r.status_code == 503 and r.json()["code"] == "StagingNotConfigured"


def test_file_removed_after_the_request_fails_naming_it(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    for i in range(5):
        setup.add(f"gone/f{i}.dat", os.urandom(1000))
    # the API alone takes the request; the processor starts after the file is gone
    api = Service(setup.root, *setup.args("--no-processor")).start()
    try:
        with api.client() as c:
            rid = post(c, [f"gone/f{i}.dat" for i in range(5)]).json()["request_id"]
            assert status(c, rid)["status"] == "staging"
            (setup.archive / "gone" / "f2.dat").unlink()
            with Service(setup.root, *setup.args(), api=False):
                failed = wait_status(c, rid, "failed")
            assert "gone/f2.dat" in failed["message"]
            assert "vanished" in failed["message"]
            assert failed["files_staged"] == 4 and failed["files_total"] == 5
            assert c.get(f"/jobs/{rid}").json()["Status"] == "error"
    finally:
        api.stop()


# The real stage task, on a disk that hangs once its first piece is copied: every
# copy_file_range after the first makes MARKER and never returns.
STALLING_STAGE = """\
import os, runpy, sys, time
marker = sys.argv.pop()
real, calls = os.copy_file_range, []
def hung(*args, **kwargs):
    calls.append(None)
    if len(calls) == 1:
        return real(*args, **kwargs)
    open(marker, "w").close()
    while True:
        time.sleep(60)
os.copy_file_range = hung
runpy.run_module("batchingest.tasks.stage", run_name="__main__", alter_sys=True)
"""


def stall_stage(setup: Setup) -> Path:
    """Make the root's stage task one whose copy hangs after its first piece, so that a
    copy is in flight for as long as a test needs, however fast or loaded the machine;
    the marker file it returns appears then. Remove ROOT/tasks/stage to undo it."""
    wrapper = setup.base / "stalling_stage.py"
    wrapper.write_text(STALLING_STAGE)
    marker = setup.base / "stalled"
    write_task(setup.root / "tasks", "stage", f"exec {sys.executable} {wrapper} {marker}\n")
    return marker


def kill_task_groups(pids: list[int]) -> int:
    """kill -9 of the process groups of a task's processes; how many were still there.

    The task runs in its own session and would finish the copy as an orphan, holding
    the job meanwhile; a crash of the whole machine stops it too."""
    killed = 0
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            group = os.getpgid(pid)
            assert group != os.getpgrp()
            os.killpg(group, signal.SIGKILL)
            killed += 1
    return killed


def task_processes(rid: str) -> list[int]:
    """Processes of the job's task: their environment names the job (a UUID, so unique)."""
    want = f"JOBNAME={rid}".encode()
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if want in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:
            continue
    return pids


def dead(pid: int) -> bool:
    """Gone, or a zombie: its descriptors, and so its unnamed copies, are closed."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def test_service_killed_mid_copy_then_restarted_finishes(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    rels = [f"big/f{i}.bin" for i in range(4)]
    for rel in rels:
        setup.add(rel, os.urandom(64 << 20))
    stalled = stall_stage(setup)
    svc = Service(setup.root, *setup.args("--stage-parallel", "2", "--stage-verify")).start()
    try:
        with svc.client() as c:
            rid = post(c, rels).json()["request_id"]
        wait_for(stalled.exists, timeout=120, what="the copy to hang after its first piece")
        assert setup.in_flight() or setup.temps(), "a copy in flight"
        tasks = task_processes(rid)
        assert tasks, "the stage task is running"
        svc.kill()
        assert kill_task_groups(tasks), "the stage task was still copying"
        wait_for(lambda: all(dead(pid) for pid in tasks), what="the stage task to die")
    finally:
        svc.stop()
    # the copy was interrupted: what has a real name is complete, the rest is absent
    for rel in rels:
        dst = setup.staging / rel
        if dst.exists():
            assert dst.read_bytes() == (setup.archive / rel).read_bytes()
    (setup.root / "tasks" / "stage").unlink()  # the built-in stage task from now on
    with Service(setup.root, *setup.args()) as svc2, svc2.client() as c:
        done = wait_status(c, rid, "ready", timeout=120)
    assert done["files_staged"] == 4
    assert setup.temps() == [] and setup.in_flight() == []
    log = (setup.root / "success" / rid / "LOG").read_text()
    assert log.count("stage: done") == 1, log  # only the run after the restart finished
    for rel in rels:
        assert (setup.staging / rel).read_bytes() == (setup.archive / rel).read_bytes()


def test_search_only_archive_folders_stage_and_an_unreadable_archive_is_a_503(
    tmp_path: Path,
) -> None:
    """Folders with search permission but no read (0111 here, 0711 in the field) are
    passed through as a path lookup would; a folder that cannot be searched hides its
    files (404); an archive that cannot be looked in is a 503 (try again), never a 404
    the DTS would take as final. The service runs so that file
    modes apply to it (tests/modes.py)."""
    setup = Setup(tmp_path)
    setup.add("sub/deeper/f", b"deep")
    setup.add("top", b"top")
    prefix = unprivileged([])
    folders = [setup.archive / "sub" / "deeper", setup.archive / "sub", setup.archive]
    for folder in folders:
        folder.chmod(0o111)
    try:
        with Service(setup.root, *setup.args(), prefix=prefix) as svc, svc.client() as c:
            r = post(c, ["sub/deeper/f", "top"])
            assert r.status_code == 201, r.text
            wait_status(c, r.json()["request_id"], "ready")
            (setup.archive / "sub").chmod(0o000)  # not even search: not there for us
            r = post(c, ["top", "sub/deeper/f"])
            assert r.status_code == 404 and r.json()["code"] == "FilesNotFound", r.text
            setup.archive.rename(tmp_path / "unmounted")
            r = post(c, ["top"])
            assert r.status_code == 503 and r.json()["code"] == "ArchiveUnavailable", r.text
            # where and why are the operator's (the log), not the client's
            assert str(tmp_path) not in r.text and "try again later" in r.json()["message"]
            assert len(setup.jobs()) == 1  # the 503s created nothing
    finally:
        for folder in folders:
            moved = tmp_path / "unmounted" / folder.relative_to(setup.archive)
            (moved if moved.exists() else folder).chmod(0o755)
    assert (setup.staging / "sub" / "deeper" / "f").read_bytes() == b"deep"
    assert (setup.staging / "top").read_bytes() == b"top"
