"""The transfer task and the transfer documents, without the service.

The task runs as the processor runs it (`python -m batchingest.tasks.transfer` in a job
folder, endpoints from its environment), on folders inside tmp_path only.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchingest import fs, transfers
from batchingest.api import staccato
from batchingest.api.errors import ApiError
from batchingest.endpoints import Endpoint, Endpoints
from batchingest.events import Recorder
from batchingest.store import Job, State, Store
from batchingest.tasks import transfer as transfer_task


class Place:
    def __init__(self, tmp: Path) -> None:
        self.src, self.dst, self.out = tmp / "src", tmp / "dst", tmp / "out"
        self.job = tmp / "job"
        for d in (self.src, self.dst, self.out, self.job):
            d.mkdir()
        (self.out / "secret").write_text("outside")
        self.env = dict(
            os.environ,
            BATCHINGEST_TRANSFER_ENDPOINTS=json.dumps(
                [["src", str(self.src), True], ["dst", str(self.dst), False]]
            ),
        )

    def run(self, **request: Any) -> tuple[int, dict[str, Any], str]:
        base = {
            "kind": "transfer",
            "id": str(uuid.uuid4()),
            "source_endpoint": "src",
            "destination_endpoint": "dst",
        }
        (self.job / transfers.REQUEST).write_text(json.dumps({**base, **request}))
        done = subprocess.run(
            [sys.executable, "-m", "batchingest.tasks.transfer"],
            cwd=self.job,
            env=self.env,
            capture_output=True,
            text=True,
        )
        progress = json.loads((self.job / transfers.PROGRESS).read_text())
        return done.returncode, progress, done.stdout + done.stderr


@pytest.fixture
def place(tmp_path: Path) -> Place:
    return Place(tmp_path)


def item(src: str, dst: str, recursive: bool = False) -> dict[str, Any]:
    return {"source_path": src, "destination_path": dst, "recursive": recursive}


@pytest.mark.parametrize(
    ("level", "copied", "copied_bytes"),
    [(None, 5, 6), (0, 1, 1), (1, 2, 3), (2, 3, 4), (3, 4, 5)],
)
def test_sync_levels(place: Place, level: int | None, copied: int, copied_bytes: int) -> None:
    """new: missing; size: other size; old: same size, older mtime, other content; same:
    same size and mtime but other content (only checksum sees it); equal: all equal."""
    for name, content in (
        ("new", b"n"),
        ("size", b"ss"),
        ("old", b"o"),
        ("same", b"a"),
        ("equal", b"e"),
    ):
        (place.src / name).write_bytes(content)
        os.utime(place.src / name, (2_000_000, 2_000_000))
    for name, content, mtime in (
        ("size", b"s", 2_000_000),
        ("old", b"O", 1_000_000),
        ("same", b"b", 2_000_000),
        ("equal", b"e", 2_000_000),
    ):
        (place.dst / name).write_bytes(content)
        os.utime(place.dst / name, (mtime, mtime))
    rc, progress, out = place.run(items=[item("/", "/", True)], sync_level=level)
    assert rc == 0, out
    assert progress["files_transferred"] == copied, out
    assert progress["files_skipped"] == 5 - copied
    assert progress["files"] == 5 and progress["bytes_transferred"] == copied_bytes
    assert (place.dst / "new").read_bytes() == b"n"
    if level in (None, 1, 2, 3):
        assert (place.dst / "size").read_bytes() == b"ss"
    if level in (None, 3):
        assert (place.dst / "same").read_bytes() == b"a"
    if level == 2:
        assert (place.dst / "same").read_bytes() == b"b"  # same size and mtime: kept


def test_links_fifos_and_extras(place: Place) -> None:
    (place.src / "tree" / "sub").mkdir(parents=True)
    (place.src / "tree" / "sub" / "f").write_text("f")
    os.symlink(place.out, place.src / "tree" / "escape")
    os.symlink(place.out / "secret", place.src / "tree" / "sub" / "leak")
    os.mkfifo(place.src / "tree" / "pipe")
    (place.dst / "copy" / "old").mkdir(parents=True)
    (place.dst / "copy" / "old" / "x").write_text("x")
    (place.dst / "copy" / "stale").write_text("s")
    rc, progress, out = place.run(
        items=[item("/tree", "/copy", True)], delete_destination_extra=True
    )
    assert rc == 0, out
    assert sorted(os.listdir(place.dst / "copy")) == ["sub"]
    assert sorted(os.listdir(place.dst / "copy" / "sub")) == ["f"]
    assert "never followed" in out and progress["files_transferred"] == 1
    assert sorted(os.listdir(place.out)) == ["secret"]


def test_paths_through_links_and_read_only(place: Place) -> None:
    os.symlink(place.out, place.src / "out")
    os.symlink(place.out, place.dst / "out")
    (place.src / "f").write_text("f")
    rc, progress, _ = place.run(
        items=[item("/out/secret", "/got"), item("/f", "/out/f"), item("/f", "/fine")]
    )
    assert rc == 1 and progress["subtasks_failed"] == 2 and progress["subtasks_succeeded"] == 1
    assert progress["fatal_error"]["code"] == "FAILED"
    assert not (place.dst / "got").exists() and sorted(os.listdir(place.out)) == ["secret"]
    assert (place.dst / "fine").read_text() == "f"
    rc, progress, _ = place.run(
        items=[item("/f", "/x")], source_endpoint="dst", destination_endpoint="src"
    )
    assert rc == 1 and "read-only" in progress["fatal_error"]["description"]


def test_cancel_and_deadline_before_start(place: Place) -> None:
    (place.src / "f").write_text("f")
    past = "2000-01-01T00:00:00Z"
    rc, progress, _ = place.run(items=[item("/f", "/f")], deadline=past)
    assert rc == 3 and progress["fatal_error"]["code"] == "DEADLINE_EXCEEDED"
    (place.job / transfers.CANCEL).write_text("x")
    rc, progress, _ = place.run(items=[item("/f", "/f")])
    assert rc == 3 and progress["fatal_error"]["code"] == "CANCELED"
    assert not (place.dst / "f").exists()


def test_delete_items(place: Place) -> None:
    (place.dst / "d" / "e").mkdir(parents=True)
    (place.dst / "file").write_text("x")
    os.symlink(place.out, place.dst / "link")
    rc, progress, out = place.run(
        kind="delete",
        endpoint="dst",
        recursive=False,
        items=[{"path": "/d"}, {"path": "/file"}, {"path": "/link"}, {"path": "/missing"}],
    )
    assert rc == 1 and progress["subtasks_failed"] == 2, out  # a folder, a missing path
    assert (place.dst / "d" / "e").is_dir() and not (place.dst / "file").exists()
    assert not os.path.lexists(place.dst / "link") and (place.out / "secret").exists()
    rc, _, out = place.run(
        kind="delete",
        endpoint="dst",
        recursive=True,
        ignore_missing=True,
        items=[{"path": "/d"}, {"path": "/missing"}],
    )
    assert rc == 0 and not (place.dst / "d").exists(), out
    rc, _, out = place.run(kind="delete", endpoint="src", items=[{"path": "/x"}])
    assert rc == 1 and "read-only" in out


def test_staccato_range_resumes_from_progress(place: Place) -> None:
    data = os.urandom(40 << 20)
    (place.src / "big").write_bytes(data)
    (place.dst / "out.bin").write_bytes(b"#" * 100)
    # an earlier run flushed the first 16 MiB of the range: only the rest is copied
    (place.job / transfers.PROGRESS).write_text(json.dumps({"progress": 16 << 20}))
    start, end = 50, (36 << 20) + 7
    rc, progress, out = place.run(
        kind="staccato",
        source_parts=["big"],
        destination_parts=["out.bin"],
        start_offset=start,
        end_offset=end,
    )
    assert rc == 0, out
    assert "resuming at offset" in out and progress["progress"] == end - start
    got = (place.dst / "out.bin").read_bytes()
    assert got[:50] == b"#" * 50 and len(got) == end
    assert got[start + (16 << 20) :] == data[start + (16 << 20) : end]
    assert got[50 : start + (16 << 20)] == b"#" * 50 + b"\0" * ((16 << 20) - 50)


def test_status_of_a_canceled_job_in_data(tmp_path: Path) -> None:
    job = Job("x", State.DATA, tmp_path)
    snap = transfers.Snapshot(
        job, {"kind": "staccato"}, {}, cancel=True, deleted=False, finished=[]
    )
    assert snap.fatal == {"code": "CANCELED", "description": "canceled by request"}
    assert staccato.state_of(snap) == "STATE_CANCELED"
    stopped = transfers.Snapshot(
        Job("x", State.ERROR, tmp_path),
        {"kind": "transfer"},
        {},
        False,
        False,
        [{"Status": "canceled", "Reason": "deadline 2026-01-01T00:00:00Z passed"}],
    )
    assert stopped.fatal is not None and stopped.fatal["code"] == "DEADLINE_EXCEEDED"


def test_task_ids_follow_submission_ids(tmp_path: Path) -> None:
    assert transfers.task_id_for("a") == transfers.task_id_for("a")
    assert transfers.task_id_for("a") != transfers.task_id_for("b")
    store = Store(tmp_path / "root")
    (tmp_path / "root").mkdir()
    store.init()
    recorder = Recorder(store)  # as the service does: a queued job's cancel is in its history
    recorder.attach()
    name = transfers.task_id_for("s")
    assert transfers.create(store, name, {"kind": "transfer", "id": name}, None)
    assert not transfers.create(store, name, {"kind": "transfer", "id": name}, None)
    assert store.get(name).state == State.QUEUE
    transfers.request_cancel(store, name)
    assert store.get(name).state == State.DATA
    snap = transfers.snapshot(store, name)
    recorder.close()
    assert snap is not None and snap.fatal is not None and snap.fatal["code"] == "CANCELED"


_PIECES = st.sampled_from(
    [
        "..",
        ".",
        "%2e",
        "%2e%2e",
        "a",
        "b",
        "link",
        "out",
        "//",
        "/",
        "%2f",
        "%00",
        "~",
        "x.txt",
        "%25",
        " ",
        ".hidden",
    ]
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(_PIECES, min_size=0, max_size=6))
def test_staccato_urls_never_leave_the_endpoints(tmp_path: Path, pieces: list[str]) -> None:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    registry = Endpoints([Endpoint("data", data)])
    url = f"file://{data}/" + "/".join(pieces)
    try:
        path = staccato.file_path(url, "source_url")
        ep, parts = staccato.locate(registry, path, "source_url")
    except ApiError as e:
        assert e.status in (400, 403)
        return
    assert ep.name == "data" and parts
    assert all(p not in ("", ".", "..") and "/" not in p and "\x00" not in p for p in parts)


def test_named_copies_and_their_leftovers(place: Place) -> None:
    """Where unnamed files cannot be made, copies are hidden files renamed into place; a
    rerun of a job cut off removes its own leftovers, and only its own."""
    place.env["BATCHINGEST_TRANSFER_UNNAMED"] = "0"
    (place.src / "tree").mkdir()
    for i in range(300):
        (place.src / "tree" / f"f{i}").write_text(str(i))
    (place.dst / "copy").mkdir()
    task = str(uuid.uuid4())
    mine = place.dst / "copy" / f".batchingest-xfer-{task}.999-1.tmp"
    other = place.dst / "copy" / ".batchingest-xfer-someone-else.999-1.tmp"
    mine.write_text("dead")
    other.write_text("alive")
    (place.dst / "copy" / "f7").write_text("older")
    (place.job / transfers.PROGRESS).write_text("{}")  # a run before this one
    rc, progress, out = place.run(id=task, items=[item("/tree", "/copy", True)])
    assert rc == 0 and progress["files_transferred"] == 300, out
    assert not mine.exists() and other.read_text() == "alive"
    names = sorted(os.listdir(place.dst / "copy"))
    assert names == sorted([other.name, *[f"f{i}" for i in range(300)]])
    assert (place.dst / "copy" / "f7").read_text() == "7"


@settings(max_examples=300, deadline=None)
@given(src=st.text(), dst=st.text())
def test_a_transferred_line_is_what_json_dumps_writes(src: str, dst: str) -> None:
    """TRANSFERRED lines are written without the encoder where no character needs an
    escape; every path gives the same line as json.dumps."""
    line = transfer_task.record(src, dst)
    assert line == json.dumps({"source_path": src, "destination_path": dst}) + "\n"
    assert json.loads(line) == {"source_path": src, "destination_path": dst}


def test_the_copying_threads_run_every_call_and_raise_the_first_error() -> None:
    """Every call of a list runs (on both threads at once), all are waited for, and the
    first exception in the list's order is raised, after the others are done."""
    copiers = transfer_task.Copiers(2)
    both = threading.Barrier(2, timeout=20)
    ran: list[int] = []

    def call(i: int, error: Exception | None = None) -> None:
        if i < 2:
            both.wait()  # broken unless the first two calls run at the same time
        time.sleep(0.01 * (i == 3))  # the last one finishes after the errors are raised
        ran.append(i)
        if error is not None:
            raise error

    try:
        copiers.run_all([functools.partial(call, i) for i in range(4)])
        assert sorted(ran) == [0, 1, 2, 3]
        ran.clear()
        first, second = ValueError("first"), KeyError("second")
        calls = [functools.partial(call, 0), functools.partial(call, 1, first),
                 functools.partial(call, 2, second), functools.partial(call, 3)]  # fmt: skip
        with pytest.raises(ValueError, match="first"):
            copiers.run_all(calls)
        assert sorted(ran) == [0, 1, 2, 3]
    finally:
        copiers.shutdown()
    assert not copiers.threads


def test_a_file_that_cannot_be_read_is_counted(place: Place) -> None:
    """A file gone between the listing and the open fails alone, and still counts among
    the files; a copied one counts its bytes once it waits to be named."""
    (place.src / "here").write_bytes(b"1234")
    job_fd = fs.open_root(place.job)
    src, dst = fs.open_root(place.src), fs.open_root(place.dst)
    endpoints = Endpoints([Endpoint("src", place.src, True), Endpoint("dst", place.dst, False)])
    run = transfer_task.Run(job_fd, {"kind": "transfer", "id": "t"}, endpoints)
    try:
        with pytest.raises(transfer_task.ItemError, match="cannot be read"):
            run.copy_file(src, "gone", dst, "gone", "gone", listed=True)
        run.copy_file(src, "here", dst, "here", "here", listed=True)
        assert (run.counters["files"], run.counters["bytes_transferred"]) == (2, 4)
        assert len(run.pending) == 1 and not (place.dst / "here").exists()
        run.commit()
        assert run.counters["files_transferred"] == 1
        assert (place.dst / "here").read_bytes() == b"1234"
    finally:
        run.workers.shutdown()
        for fd in (job_fd, src, dst):
            os.close(fd)


def test_the_task_starts_without_thread_pools_or_checksums() -> None:
    """The transfer task imports neither concurrent.futures (and logging) nor hashlib
    (OpenSSL) nor secrets at its start: milliseconds of every transfer's CPU."""
    heavy = ["concurrent.futures", "logging", "hashlib", "secrets"]
    code = (
        f"import sys, batchingest.tasks.transfer; print([m for m in {heavy!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)  # fmt: skip
    assert out.stdout.strip() == "[]"


def ask_and_note(run: transfer_task.Run, asked: list[str]) -> None:
    """Note in asked every name run.in_sync is asked about."""
    real = run.in_sync

    def in_sync(src: int, st: os.stat_result, dst: int, name: str) -> bool:
        asked.append(name)
        return real(src, st, dst, name)

    run.in_sync = in_sync  # type: ignore[method-assign]


def test_a_folder_this_run_creates_is_not_asked_whether_files_are_in_sync(
    place: Place,
) -> None:
    """Into a folder the run made, every file is copied without an lstat of its name (a
    sync level has nothing to compare with there); into one that was there, each is
    compared and, being the same, skipped."""
    for d in ("a", "a/b"):
        (place.src / "tree" / d).mkdir(parents=True)
        for i in range(3):
            (place.src / "tree" / d / f"f{i}").write_text(str(i))
    endpoints = Endpoints([Endpoint("src", place.src, True), Endpoint("dst", place.dst, False)])
    job_fd = fs.open_root(place.job)
    asked: list[str] = []
    try:
        for rnd in range(2):
            request = {"kind": "transfer", "id": "t", "source_endpoint": "src",
                       "destination_endpoint": "dst", "sync_level": 1,
                       "items": [item("/tree", "/copy", True)]}  # fmt: skip
            run = transfer_task.Run(job_fd, request, endpoints)
            ask_and_note(run, asked)
            try:
                transfer_task.run_items(run)
            finally:
                run.workers.shutdown()
            assert not run.errors
            if rnd == 0:
                assert asked == [] and run.counters["files_transferred"] == 6
            else:
                assert len(asked) == 6 and run.counters["files_skipped"] == 6
    finally:
        os.close(job_fd)
    assert (place.dst / "copy" / "a" / "b" / "f2").read_text() == "2"


def test_a_run_killed_in_its_first_copy_is_swept_by_the_next(place: Place) -> None:
    """The progress file is there before the first copy, so a run killed (-9) during
    that copy is known to the next as one cut off, which removes its hidden copy."""
    place.env["BATCHINGEST_TRANSFER_UNNAMED"] = "0"
    (place.src / "f").write_text("x" * 100)
    task = str(uuid.uuid4())
    request = {"kind": "transfer", "id": task, "source_endpoint": "src",
               "destination_endpoint": "dst", "items": [item("/f", "/f")]}  # fmt: skip
    (place.job / transfers.REQUEST).write_text(json.dumps(request))
    slow = dict(place.env, BATCHINGEST_TRANSFER_MAX_RATE="1")  # 100 s for its 100 bytes
    proc = subprocess.Popen([sys.executable, "-m", "batchingest.tasks.transfer"],
                            cwd=place.job, env=slow)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not [p for p in place.dst.iterdir() if p.name.startswith(".batchingest-xfer-")]:
            assert proc.poll() is None and time.monotonic() < deadline, "no copy begun"
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert (place.job / transfers.PROGRESS).exists()
    rc, progress, out = place.run(id=task, items=[item("/f", "/f")])
    assert rc == 0 and progress["files_transferred"] == 1, out
    assert sorted(os.listdir(place.dst)) == ["f"]


def test_the_copying_threads_go_on_with_fewer_when_no_more_can_be_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A thread the system refuses: the calls run on those started; none at all is an
    OSError (EAGAIN) the run fails with, and shutdown joins only started threads."""
    started = 0
    real_start = threading.Thread.start

    def start_one(self: threading.Thread) -> None:
        nonlocal started
        if started >= allowed:
            raise RuntimeError("can't start new thread")
        started += 1
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start_one)
    allowed = 1
    copiers = transfer_task.Copiers(2)
    ran: list[int] = []
    try:
        copiers.run_all([functools.partial(ran.append, i) for i in range(5)])
        assert sorted(ran) == [0, 1, 2, 3, 4] and len(copiers.threads) == 1
    finally:
        copiers.shutdown()
    allowed = 0
    none = transfer_task.Copiers(2)
    with pytest.raises(OSError, match="no thread could be started"):
        none.run_all([functools.partial(ran.append, 9)])
    none.shutdown()
    assert 9 not in ran
