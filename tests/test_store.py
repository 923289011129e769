"""The jobs root store: layout, names, moves that never overwrite, holding, deleting."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import as_shared
from hypothesis import given, settings
from hypothesis import strategies as st

from batchingest import lease
from batchingest.store import (
    BUSY,
    FINAL,
    STATE_OF_STATUS,
    STATES,
    STATUS_OF_STATE,
    SWEEP_AGE,
    InvalidName,
    Job,
    JobBusy,
    JobNotFound,
    State,
    Store,
    StoreError,
    check_name,
    rename_noreplace,
    valid_name,
)

NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"


def put(store: Store, state: str, name: str, files: dict[str, str] | None = None) -> Path:
    """A job folder placed in a state by hand, as an operator with `mv` would."""
    path = store.root / state / name
    path.mkdir()
    for rel, content in (files or {"token": name}).items():
        (path / rel).write_text(content)
    return path


def states_of(store: Store, name: str) -> list[str]:
    return [s for s in STATES if (store.root / s / name).is_dir()]


# -- names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a", "A", "0", "job-1", "a.b_c-d", "x.", "-lead", "_", "a" * 255, "a..b"]
)
def test_valid_names(name: str) -> None:
    assert valid_name(name)
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", ".hidden", "a/b", "a b", "a\nb", "é", "a" * 256, "a:b", "a\x00", "/a", "*"],
)
def test_invalid_names(name: str) -> None:
    assert not valid_name(name)
    with pytest.raises(InvalidName) as e:
        check_name(name)
    assert "1-255 characters" in str(e.value)


@given(st.text(max_size=300))
def test_valid_name_is_exactly_the_rule(name: str) -> None:
    expected = (
        1 <= len(name) <= 255 and all(c in NAME_CHARS for c in name) and not name.startswith(".")
    )
    assert valid_name(name) is expected
    if not expected:
        with pytest.raises(InvalidName):
            check_name(name)


valid_names = st.text(alphabet=NAME_CHARS, min_size=1, max_size=255).filter(
    lambda n: not n.startswith(".")
)


@settings(max_examples=60, deadline=None)
@given(names=st.lists(valid_names, min_size=1, max_size=5, unique=True))
def test_generated_names_round_trip(
    tmp_path_factory: pytest.TempPathFactory, names: list[str]
) -> None:
    store = Store(tmp_path_factory.mktemp("names") / "root")
    store.init()
    for name in names:
        job, created = store.create(name)
        assert created and job == Job(name, "data", store.root / "data" / name)
        assert store.find(name) == job
        assert store.get(name).status == "ready"
    assert [j.name for j in store.list()] == sorted(names)
    for name in names:
        job, moved = store.queue(name)
        assert moved and job.state == "queue" and job.name == name


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    store = Store(tmp_path_factory.mktemp("shared") / "root")
    store.init()
    return store


@given(st.text(max_size=20).filter(lambda n: not valid_name(n)))
def test_bad_names_are_refused_everywhere(shared_store: Store, name: str) -> None:
    store = shared_store
    for call in (store.find, store.get, store.create, store.queue, store.delete):
        with pytest.raises(InvalidName):
            call(name)
    with pytest.raises(InvalidName):
        store.job_path("data", name)
    assert store.list() == []


# -- init --------------------------------------------------------------------------------


def test_init_creates_missing_state_folders(tmp_path: Path) -> None:
    root = tmp_path / "a" / "root"
    Store(root).init()
    assert sorted(p.name for p in root.iterdir()) == sorted(STATES)
    (root / "queue").rmdir()
    put_job = root / "success" / "kept"
    put_job.mkdir()
    Store(root).init()
    assert (root / "queue").is_dir() and put_job.is_dir()
    assert not [p for p in root.iterdir() if p.name.startswith(".probe")]


def test_init_clears_trash_left_by_a_crash(store: Store) -> None:
    left = store.root / ".trash" / "job.abc"
    left.mkdir(parents=True)
    (left / "f").write_text("x")
    store.init()
    assert list((store.root / ".trash").iterdir()) == []


def test_init_refuses_a_root_that_is_a_file(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.write_text("not a folder")
    with pytest.raises(StoreError, match="not usable"):
        Store(root).init()


def test_init_refuses_a_root_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match=str(tmp_path / "file" / "root")):
        Store(tmp_path / "file" / "root").init()


def test_init_refuses_a_state_that_is_a_file(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "queue").write_text("x")
    with pytest.raises(StoreError):
        Store(root).init()


def test_layout_helpers(store: Store) -> None:
    assert store.job_path("queue", "j") == store.root / "queue" / "j"
    assert store.service_path("outbox") == store.root / ".outbox"
    with pytest.raises(ValueError, match="unknown state"):
        store.state_dir("trash")
    assert Store("relative").root.is_absolute()


# -- create, find, get, list ------------------------------------------------------------------


def test_create_find_get(store: Store) -> None:
    assert store.find("j") is None
    with pytest.raises(JobNotFound):
        store.get("j")
    job, created = store.create("j")
    assert created and job == Job("j", "data", store.root / "data" / "j") and job.path.is_dir()
    again, created = store.create("j")
    assert not created and again == job
    assert store.get("j") == job


def test_create_returns_job_in_any_state(store: Store) -> None:
    put(store, "error", "j")
    job, created = store.create("j")
    assert not created and job.state == "error"
    assert not (store.root / "data" / "j").exists()


def test_find_every_state_and_status(store: Store) -> None:
    for state in STATES:
        put(store, state, f"in-{state}")
        job = store.get(f"in-{state}")
        assert job.state == state
        assert job.status == ("ready" if state == "data" else state)


def test_find_ignores_files(store: Store) -> None:
    (store.root / "queue" / "stray").write_text("x")
    assert store.find("stray") is None


def test_list_sorted_and_ignoring_non_jobs(store: Store) -> None:
    put(store, "success", "b")
    put(store, "data", "c")
    put(store, "queue", "a")
    put(store, "error", "a2")
    (store.root / "queue" / ".hidden").mkdir()
    (store.root / "data" / ".build-x").mkdir()
    (store.root / "queue" / "stray-file").write_text("x")
    (store.root / "error" / "bad name").mkdir()
    (store.root / "success" / "link").symlink_to(store.root / "nowhere")
    jobs = store.list()
    assert [(j.name, j.state, j.status) for j in jobs] == [
        ("a", "queue", "queue"),
        ("a2", "error", "error"),
        ("b", "success", "success"),
        ("c", "data", "ready"),
    ]
    assert [j.name for j in store.list(["queue", "success"])] == ["a", "b"]
    assert store.list(["processing"]) == []


def test_list_of_missing_state_folder_is_empty(store: Store) -> None:
    (store.root / "error").rmdir()
    assert store.list(["error"]) == []


# -- queue and move -----------------------------------------------------------------------


@pytest.mark.parametrize("state", ["data", "error", "success"])
def test_queue_moves_from(store: Store, state: str) -> None:
    put(store, state, "j", {"f": "content"})
    seen: list[tuple[Job, str | None]] = []
    store.subscribe(lambda job, old: seen.append((job, old)))
    job, moved = store.queue("j")
    assert moved and job == Job("j", "queue", store.root / "queue" / "j")
    assert states_of(store, "j") == ["queue"]
    assert (job.path / "f").read_text() == "content"
    assert seen == [(job, state)]


@pytest.mark.parametrize("state", ["queue", "processing"])
def test_queue_is_a_no_op_when_waiting_or_running(store: Store, state: str) -> None:
    put(store, state, "j")
    seen: list[object] = []
    store.subscribe(lambda job, old: seen.append(job))
    job, moved = store.queue("j")
    assert not moved and job.state == state
    assert states_of(store, "j") == [state]
    assert seen == []


def test_queue_missing_job(store: Store) -> None:
    with pytest.raises(JobNotFound):
        store.queue("nope")


def test_move_into_queue_never_overwrites(store: Store) -> None:
    put(store, "error", "j", {"token": "old"})
    put(store, "queue", "j", {"token": "new"})
    with pytest.raises(FileExistsError):
        store.move("j", "error", "queue")
    assert (store.root / "error" / "j" / "token").read_text() == "old"
    assert (store.root / "queue" / "j" / "token").read_text() == "new"


def test_move_into_queue_refuses_an_empty_folder_too(store: Store) -> None:
    put(store, "data", "j", {"token": "mine"})
    (store.root / "queue" / "j").mkdir()
    with pytest.raises(FileExistsError):
        store.move("j", "data", "queue")
    assert (store.root / "data" / "j" / "token").read_text() == "mine"


def test_move_missing_source(store: Store) -> None:
    put(store, "data", "j")
    with pytest.raises(JobNotFound):
        store.move("j", "error", "queue")


@pytest.mark.parametrize("final", ["success", "error"])
def test_finished_job_takes_first_free_suffix(store: Store, final: str) -> None:
    put(store, final, "j", {"token": "first"})
    put(store, final, "j-001", {"token": "second"})
    names = []
    for i in range(3):
        put(store, "queue", "j", {"token": f"run{i}"})
        hold = store.claim("j")
        assert hold is not None
        names.append(store.finish(hold, final).name)
    assert names == ["j-002", "j-003", "j-004"]
    root = store.root / final
    assert (root / "j" / "token").read_text() == "first"
    assert (root / "j-001" / "token").read_text() == "second"
    assert [(root / n / "token").read_text() for n in names] == ["run0", "run1", "run2"]


def test_finished_job_never_replaces_an_empty_folder(store: Store) -> None:
    (store.root / "success" / "j").mkdir()
    put(store, "queue", "j", {"token": "mine"})
    hold = store.claim("j")
    assert hold is not None
    job = store.finish(hold, "success")
    assert job.name == "j-001"
    assert list((store.root / "success" / "j").iterdir()) == []
    assert (job.path / "token").read_text() == "mine"


def test_finished_job_never_replaces_a_file(store: Store) -> None:
    (store.root / "error" / "j").write_text("someone's file")
    put(store, "data", "j")
    assert store.move("j", "data", "error").name == "j-001"
    assert (store.root / "error" / "j").read_text() == "someone's file"


def test_longest_name_suffix_stays_a_valid_name(store: Store) -> None:
    name = "x" * 250 + "abcde"
    put(store, "success", name)
    put(store, "queue", name, {"token": "mine"})
    hold = store.claim(name)
    assert hold is not None
    job = store.finish(hold, "success")
    assert valid_name(job.name) and job.name == "x" * 250 + "a-001"
    assert (job.path / "token").read_text() == "mine"
    assert store.list(["processing"]) == []


def test_rename_noreplace(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for target in ("empty", "file"):
        with pytest.raises(FileExistsError):
            rename_noreplace(tmp_path / "src", tmp_path / target)
    with pytest.raises(FileNotFoundError):
        rename_noreplace(tmp_path / "absent", tmp_path / "new")
    rename_noreplace(tmp_path / "src", tmp_path / "new")
    assert (tmp_path / "new").is_dir() and not (tmp_path / "src").exists()


def test_failing_listener_does_not_stop_a_move(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(job: Job, old: str | None) -> None:
        raise RuntimeError("listener bug")

    seen: list[str] = []
    store.subscribe(boom)
    store.subscribe(lambda job, old: seen.append(job.state))
    put(store, "data", "j")
    with caplog.at_level(logging.ERROR):
        assert store.queue("j")[1]
    assert seen == ["queue"] and "listener failed" in caplog.text


# -- queued() ------------------------------------------------------------------------------


def test_queued_oldest_first_then_by_name(store: Store) -> None:
    now = time.time()
    for name, age in [("new", 10), ("old", 300), ("b-tie", 100), ("a-tie", 100)]:
        path = put(store, "queue", name)
        os.utime(path, (now - age, now - age))
    put(store, "data", "not-queued")
    assert store.queued() == ["old", "a-tie", "b-tie", "new"]


def test_queued_skips_strays_without_raising(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    q = store.root / "queue"
    put(store, "queue", "good")
    (q / "stray.txt").write_text("x")
    (q / "bad name").mkdir()
    (q / ".partial").mkdir()
    (q / "dangling").symlink_to(store.root / "nowhere")
    with caplog.at_level(logging.WARNING, logger="batchingest.store"):
        assert store.queued() == ["good"]
        assert store.queued() == ["good"]
    warnings = [r.getMessage() for r in caplog.records]
    # each stray is reported once, however often the queue is scanned; hidden ones never
    assert sum("stray.txt" in w for w in warnings) == 1
    assert sum("bad name" in w for w in warnings) == 1
    assert not any(".partial" in w for w in warnings)


def test_queued_without_queue_folder(store: Store) -> None:
    (store.root / "queue").rmdir()
    assert store.queued() == []


# -- claim, finish, recover --------------------------------------------------------------------


def test_claim_and_finish(store: Store) -> None:
    put(store, "queue", "j", {"token": "t"})
    hold = store.claim("j")
    assert hold is not None and hold.path == store.root / "processing" / "j"
    assert states_of(store, "j") == ["processing"]
    assert store.claim("j") is None  # not in queue/ any more
    job = store.finish(hold, "success")
    assert job == Job("j", "success", store.root / "success" / "j")
    assert hold.fd == -1
    assert (job.path / "token").read_text() == "t"
    hold.release()  # releasing twice is harmless


@pytest.mark.parametrize("shared", [False, True])
def test_a_claim_carries_when_the_job_entered_queue(store: Store, shared: bool) -> None:
    """Not the claim's own rename, nor (a shared root) the `.lock` it makes first."""
    if shared:
        as_shared(store)
    put(store, "queue", "j", {})
    arrived = os.lstat(store.root / "queue" / "j").st_ctime
    time.sleep(0.02)
    hold = store.claim("j")
    assert hold is not None and hold.ctime == arrived
    store.finish(hold, "success")


def test_claim_of_absent_or_stray(store: Store) -> None:
    assert store.claim("absent") is None
    (store.root / "queue" / "stray").write_text("x")
    assert store.claim("stray") is None
    assert (store.root / "queue" / "stray").read_text() == "x"


def test_recover_leaves_live_holds_alone(store: Store) -> None:
    put(store, "queue", "held")
    put(store, "queue", "released")
    held = store.claim("held")
    released = store.claim("released")
    assert held is not None and released is not None
    # a second Store object (as another processor would use) sees the lock too
    assert Store(store.root).recover() == []
    released.release()
    assert Store(store.root).recover() == ["released"]
    assert states_of(store, "released") == ["queue"]
    assert states_of(store, "held") == ["processing"]
    # a recovered job can be claimed again
    again = store.claim("released")
    assert again is not None
    store.finish(again, "success")
    store.finish(held, "error")
    assert store.recover() == []


def test_recover_ignores_non_jobs_in_processing(store: Store) -> None:
    (store.root / "processing" / "stray").write_text("x")
    (store.root / "processing" / ".x").mkdir()
    (store.root / "processing" / "bad name").mkdir()
    assert store.recover() == []
    assert (store.root / "processing" / "bad name").is_dir()


def test_recover_after_crash_of_plain_rename(store: Store) -> None:
    """A job moved into processing/ by hand (or by a dead processor) with no lock goes back."""
    put(store, "processing", "j")
    assert store.recover() == ["j"]
    assert states_of(store, "j") == ["queue"]


def test_threads_race_for_each_job_exactly_one_wins(root: Path) -> None:
    names = [f"job{i:03d}" for i in range(40)]
    store = Store(root)
    for name in names:
        put(store, "queue", name)
    n_threads = 6
    barrier = threading.Barrier(n_threads)
    wins: list[list[str]] = [[] for _ in range(n_threads)]
    holds = []

    def worker(i: int) -> None:
        mine = Store(root)  # each worker its own Store, like separate processors
        barrier.wait()
        for name in names:
            hold = mine.claim(name)
            if hold is not None:
                wins[i].append(name)
                holds.append(hold)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [n for w in wins for n in w]
    assert sorted(claimed) == names  # every job claimed, none twice
    assert store.recover() == []  # all still held
    for hold in holds:
        hold.release()
    assert sorted(store.recover()) == names


CLAIMER = r"""
import sys, time
from pathlib import Path
from batchingest.store import Store
root, go, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
store = Store(root)
while not go.exists():
    time.sleep(0.001)
holds = [h for h in (store.claim(n) for n in names) if h is not None]
print(" ".join(h.name for h in holds), flush=True)
sys.stdin.read()  # hold the jobs until told to stop (or killed)
"""


def test_processes_race_and_flock_holds_across_processes(root: Path) -> None:
    store = Store(root)
    names = [f"job{i:03d}" for i in range(60)]
    for name in names:
        put(store, "queue", name)
    go = root.parent / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, str(root), str(go), *names[i:], *names[:i]],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in (0, 20, 40)
    ]
    try:
        go.touch()
        results = []
        for p in procs:
            assert p.stdout is not None
            results.append(p.stdout.readline().split())
        assert sorted(n for r in results for n in r) == names
        assert all(store.find(n).state == "processing" for n in names)  # type: ignore[union-attr]
        # the holders are alive: neither this process nor a new Store takes their jobs
        assert store.recover() == []
        assert Store(root).recover() == []
        for name in names:
            with pytest.raises(JobBusy):
                store.delete(name)
        # kill -9 of one holder: the kernel drops its locks and its jobs come back
        procs[0].kill()
        procs[0].wait()
        assert sorted(store.recover()) == sorted(results[0])
        assert sorted(j.name for j in store.list(["queue"])) == sorted(results[0])
        # a clean exit without finishing releases too
        assert procs[1].stdin is not None
        procs[1].stdin.close()
        procs[1].wait(10)
        assert sorted(store.recover()) == sorted(results[1])
        assert sorted(j.name for j in store.list(["processing"])) == sorted(results[2])
    finally:
        for p in procs:
            p.kill()
            p.wait()


ORPHANING_CLAIMER = r"""
import subprocess, sys
from batchingest.store import Store
hold = Store(sys.argv[1]).claim("j")
task = subprocess.Popen(["sleep", "60"], pass_fds=(hold.lock_fd,), start_new_session=True)
print(task.pid, flush=True)
sys.stdin.read()
"""


def test_kill_9_with_a_task_left_running_keeps_the_folder_locked_until_it_exits(
    root: Path,
) -> None:
    """On a local root the job folder's own flock is the hold: the task inherits it, so a
    holder killed with -9 leaves its job held by the orphaned task, and only its end
    lets recovery take the job back (never run beside the orphan)."""
    store = Store(root)
    put(store, "queue", "j")
    argv = [sys.executable, "-c", ORPHANING_CLAIMER, str(root)]
    claimer = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert claimer.stdout is not None
    orphan = int(claimer.stdout.readline())
    try:
        assert os.listdir(root / "processing" / "j") == ["token"]  # no .lock, no .lease
        claimer.kill()
        claimer.wait()
        assert store.recover() == []  # the orphan holds it
        with pytest.raises(JobBusy):
            store.delete("j")
    finally:
        os.kill(orphan, 9)
    for _ in range(200):  # reaped by init, a moment later
        if not os.path.exists(f"/proc/{orphan}") or "Z" in _proc_state(orphan):
            break
        time.sleep(0.01)
    assert store.recover() == ["j"]
    assert os.listdir(root / "queue" / "j") == ["token"]


def test_a_job_held_by_an_earlier_versions_lock_file_is_neither_recovered_nor_claimed(
    store: Store,
) -> None:
    """Before folder locks a job was held by a flock on its `.lock` file: a task that an
    earlier version left running when it was killed with -9 still holds it so, and its
    lease names a dead pid. The job is held until that lock is let go."""
    path = put(store, "queue", "j")
    (path / ".lock").write_text("")
    old = os.open(path / ".lock", os.O_RDWR)
    fcntl.flock(old, fcntl.LOCK_EX)
    dead = subprocess.Popen(["true"])
    dead.wait()
    me = lease.Owner.here()
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        clock = lease.Clock(store.root_fd, me.host)
        got = lease.acquire(dir_fd, lease.Owner(me.host, me.boot, dead.pid), 60, clock, True)
        assert got is not None
        got.held.close()
        assert store.claim("j") is None  # a claim of the old version's, mid-way
        os.rename(path, store.root / "processing" / "j")
        assert store.recover() == [] and store.stuck() == []
        assert states_of(store, "j") == ["processing"]
        with pytest.raises(JobBusy):
            store.delete("j")
    finally:
        os.close(dir_fd)
        os.close(old)
    assert store.stuck() == ["j"]
    assert store.recover() == ["j"]


def test_a_folder_that_cannot_be_locked_is_stuck_not_an_error(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job folder the kernel refuses to lock (ENOLCK: out of lock memory, or a file
    system without flock) cannot be told held or free: GET /stuck lists it for a person
    rather than failing as a whole."""
    put(store, "processing", "j")
    put(store, "processing", "k")
    real = fcntl.flock

    def refuse_folders(fd: int, op: int) -> None:
        if os.fstat(fd).st_ino == (store.root / "processing" / "j").stat().st_ino:
            raise OSError(errno.ENOLCK, "No locks available")
        real(fd, op)

    monkeypatch.setattr(fcntl, "flock", refuse_folders)
    assert store.stuck() == ["j", "k"]


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_a_job_whose_folder_lock_is_held_is_not_claimed_twice(store: Store) -> None:
    """Another holder's flock on the folder (a processor mid-claim, an upload) keeps a
    claim, an unqueue and a delete away; a `.lock` planted in the job means nothing."""
    path = put(store, "queue", "j")
    (path / ".lock").symlink_to(store.root.parent / "outside")
    other = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert store.claim("j") is None
        assert Store(store.root).claim("j") is None
        assert store.unqueue("j") is None
        with pytest.raises(JobBusy):
            store.delete("j")
    finally:
        os.close(other)
    hold = store.claim("j")
    assert hold is not None and hold.fd == -1 and hold.lock_fd == hold.dir_fd
    assert store.claim("j") is None and Store(store.root).recover() == []
    store.finish(hold, "success")
    assert not (store.root.parent / "outside").exists()
    assert sorted(os.listdir(store.root / "success" / "j")) == [".lock", "token"]


# -- delete -----------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["data", "queue", "success", "error"])
def test_delete(store: Store, state: str) -> None:
    put(store, state, "j", {"a": "1", "b": "2"})
    assert store.delete("j") is True
    assert store.find("j") is None
    assert list((store.root / ".trash").iterdir()) == []
    assert store.delete("j") is False


def test_delete_absent(store: Store) -> None:
    assert store.delete("never") is False


def test_delete_refuses_processing(store: Store) -> None:
    put(store, "queue", "j")
    hold = store.claim("j")
    assert hold is not None
    with pytest.raises(JobBusy, match="being processed"):
        store.delete("j")
    hold.release()
    # in processing/ with no holder: still refused, recover() decides its fate
    with pytest.raises(JobBusy):
        store.delete("j")
    assert states_of(store, "j") == ["processing"]


@pytest.mark.parametrize("shared", [False, True])
def test_delete_refuses_a_held_job(store: Store, shared: bool) -> None:
    """A job locked by someone (a processor mid-claim, an orphaned task) is not deleted:
    by a flock on its folder (a local root) or on its `.lock` (a shared one)."""
    if shared:
        as_shared(store)
    path = put(store, "error", "j")
    if shared:
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    else:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(JobBusy, match="held"):
            store.delete("j")
        assert path.is_dir()
    finally:
        os.close(fd)
    assert store.delete("j") is True


def test_no_listing_shows_a_half_deleted_job(store: Store) -> None:
    n_files = 300
    names = [f"big{i}" for i in range(8)]
    for name in names:
        put(store, "success", name, {f"f{k}": "x" for k in range(n_files)})
    done = threading.Event()
    seen_partial: list[tuple[str, int]] = []

    def watch() -> None:
        while not done.is_set():
            for job in store.list():
                try:
                    # hidden entries (delete's own .lock) are not part of the job
                    count = len([f for f in os.listdir(job.path) if not f.startswith(".")])
                except FileNotFoundError:
                    continue  # gone between listing and looking: fine
                # A listdir that opened the folder just before it was renamed into the
                # trash reads on through the rename and sees files vanish: that is the
                # trash being emptied, not a job in its state folder. Only a folder still
                # in place after the count would be a half-deleted job on show.
                if count != n_files and os.path.isdir(job.path):
                    seen_partial.append((job.name, count))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for name in names:
            assert store.delete(name)
    finally:
        done.set()
        watcher.join()
    assert seen_partial == []
    assert store.list() == []


def test_delete_longest_name(store: Store) -> None:
    name = "y" * 255
    put(store, "error", name)
    assert store.delete(name) is True
    assert store.find(name) is None


def test_a_symlink_in_a_state_folder_is_never_a_job(store: Store, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    os.symlink(outside, store.state_dir("data") / "evil")
    os.symlink(outside, store.state_dir("queue") / "evil2")
    assert store.find("evil") is None
    assert store.list() == []
    assert store.job_names("data") == []
    assert store.queued() == []
    assert store.delete("evil") is False
    assert (outside / "secret").read_text() == "s"


def test_read_looks_again_when_the_job_moves_during_the_read(store: Store) -> None:
    store.create("j")
    store.queue("j")
    seen: list[str] = []

    def read(job: Job) -> str:
        seen.append(job.state)
        if len(seen) == 1:  # a processor claims it while we read the queued folder
            hold = store.claim("j")
            assert hold is not None
            hold.release()
        return job.state

    found = store.read("j", read)
    assert found is not None
    job, value = found
    assert seen == ["queue", "processing"]
    assert job.state == value == "processing"
    assert store.read("nope", read) is None


# -- states as an enum -------------------------------------------------------------------


def test_states_are_an_enum_that_still_reads_as_strings(store: Store) -> None:
    assert STATES == ("data", "queue", "processing", "success", "error") == tuple(State)
    assert State.DATA.status == "ready" and State.ERROR.status == "error"
    assert {"queue", "processing"} == BUSY and {"success", "error"} == FINAL
    assert STATUS_OF_STATE["data"] == "ready" and STATE_OF_STATUS["ready"] is State.DATA
    job, _ = store.create("j")
    assert job.state is State.DATA and job.state == "data" and f"{job.state}/x" == "data/x"
    assert store.jobs() == store.list() == [job]
    assert store.jobs(["data"]) == [job] and store.jobs([State.ERROR]) == []


# -- what a job folder may hold: links and special files (issue 8) -------------------------


@pytest.mark.parametrize("state", ["queue", "processing", "success", "data"])
def test_init_refuses_a_state_folder_that_is_a_link(tmp_path: Path, state: str) -> None:
    root = tmp_path / "root"
    Store(root).init()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / state).rmdir()
    (root / state).symlink_to(elsewhere)
    with pytest.raises(StoreError, match=f"{root / state} is a symbolic link"):
        Store(root).init()


def test_init_refuses_a_trash_link_and_leaves_its_target_alone(tmp_path: Path) -> None:
    root = tmp_path / "root"
    Store(root).init()
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "sub" / "file").write_text("keep me")
    (root / ".trash").symlink_to(precious)
    with pytest.raises(StoreError, match="symbolic link"):
        Store(root).init()
    assert (precious / "sub" / "file").read_text() == "keep me"
    # a delete does not move the job there either
    put(Store(root), "data", "j")
    with pytest.raises(StoreError):
        Store(root).delete("j")
    assert (root / "data" / "j").is_dir() and os.listdir(precious) == ["sub"]


def test_a_lock_link_creates_nothing_outside_and_the_job_is_skipped(
    shared_fs_store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = shared_fs_store
    outside = tmp_path / "outside-lock"
    put(store, "queue", "linked")
    (store.root / "queue" / "linked" / ".lock").symlink_to(outside)
    put(store, "queue", "fine")
    with caplog.at_level(logging.WARNING, "batchingest.store"):
        assert store.claim("linked") is None
        assert store.claim("linked") is None
    assert not outside.exists()
    assert states_of(store, "linked") == ["queue"]
    warnings = [r.getMessage() for r in caplog.records if "queue/linked" in r.getMessage()]
    assert len(warnings) == 1 and "symbolic link" in warnings[0]
    hold = store.claim("fine")
    assert hold is not None
    store.finish(hold, "success")


@pytest.mark.parametrize("kind", ["folder", "fifo", "readonly-folder"])
def test_an_unusable_lock_is_skipped_never_fatal(shared_fs_store: Store, kind: str) -> None:
    store = shared_fs_store
    for state in ("queue", "processing", "data"):
        lock = put(store, state, f"bad-{state}") / ".lock"
        if kind == "fifo":
            os.mkfifo(lock)
        else:
            lock.mkdir()
            if kind == "readonly-folder":
                lock.chmod(0o500)
    assert store.claim("bad-queue") is None
    assert store.recover() == []  # no exception: the others are still recovered
    assert store.hold_unqueued("bad-data", wait=0) is None
    with pytest.raises(JobBusy, match="cannot be locked"):
        store.delete("bad-data")
    assert states_of(store, "bad-processing") == ["processing"]
    put(store, "processing", "orphan")
    assert store.recover() == ["orphan"]


def test_a_finished_job_carries_no_lock(shared_fs_store: Store) -> None:
    store = shared_fs_store
    put(store, "queue", "j")
    hold = store.claim("j")
    assert hold is not None and (hold.path / ".lock").exists()
    job = store.finish(hold, "success")
    assert sorted(os.listdir(job.path)) == ["token"]
    edit = store.hold_unqueued("j")
    assert edit is not None and (job.path / ".lock").exists()
    edit.release()
    assert sorted(os.listdir(job.path)) == ["token"]
    put(store, "processing", "dead")
    assert store.recover() == ["dead"]
    assert sorted(os.listdir(store.root / "queue" / "dead")) == ["token"]


def test_a_released_lock_that_someone_still_has_open_holds_nothing(shared_fs_store: Store) -> None:
    """Removing `.lock` on release is safe: a late locker of the old file backs off."""
    store = shared_fs_store
    put(store, "data", "j")
    hold = store.hold_unqueued("j")
    assert hold is not None
    late = os.open(store.root / "data" / "j" / ".lock", os.O_RDWR)  # opened before release
    try:
        hold.release()
        fcntl.flock(late, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the old file: lockable now
        # ...but it is no longer the job's lock, so the job is free for others
        again = store.hold_unqueued("j", wait=0)
        assert again is not None
        again.release()
        assert store.delete("j")
    finally:
        os.close(late)


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def test_init_sweeps_stale_temporaries_and_free_locks(store: Store) -> None:
    old_tmp = {".JOB.0123456789ab.tmp", ".PROGRESS.json.k2j_9xzq.tmp"}
    kept = {"data.tmp", ".notes.tmp", ".JOB.tmp", ".JOB.fresh0000000.tmp"}
    for state in ("data", "queue", "success", "error"):
        job = put(store, state, f"j-{state}")
        for name in old_tmp | kept:
            (job / name).write_text("x")
            if name in old_tmp:
                _age(job / name, SWEEP_AGE + 5)
        (job / ".lock").write_text("")
    (store.root / "success" / "j-success" / "sub").mkdir()
    held = os.open(store.root / "error" / "j-error" / ".lock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        running = put(store, "processing", "running")
        (running / ".JOB.0123456789ab.tmp").write_text("x")
        _age(running / ".JOB.0123456789ab.tmp", SWEEP_AGE + 5)
        (store.root / ".probe-0123").write_text("")
        store.init()
        for state in ("data", "queue", "success", "error"):
            left = set(os.listdir(store.root / state / f"j-{state}"))
            assert not left & old_tmp
            assert kept <= left
            assert (".lock" in left) == (state == "error")  # a held lock stays
        assert (running / ".JOB.0123456789ab.tmp").exists()  # processing/: recover's
        assert not (store.root / ".probe-0123").exists()
    finally:
        os.close(held)


def test_recover_removes_the_dead_runs_temporaries_at_once(store: Store) -> None:
    job = put(store, "processing", "j")
    (job / ".JOB.0123456789ab.tmp").write_text("half")
    (job / ".keep").write_text("x")
    assert store.recover() == ["j"]
    assert sorted(os.listdir(store.root / "queue" / "j")) == [".keep", "token"]


def test_open_job_gives_the_folder_and_refuses_a_link(store: Store, tmp_path: Path) -> None:
    """Store.open_job works on kernels with openat2 (a folder open once passed a mode: EINVAL)."""
    job, _ = store.create("j")
    (job.path / "f").write_text("x")
    fd = store.open_job(job)
    try:
        assert os.listdir(fd) == ["f"]
    finally:
        os.close(fd)
    (store.root / "error" / "l").symlink_to(tmp_path)
    with pytest.raises(OSError):
        store.open_job(Job("l", State.ERROR, store.root / "error" / "l"))


SHORT_OF_DESCRIPTORS = r"""
import errno, logging, os, resource, sys
from batchingest.store import Store
logging.basicConfig(level=logging.WARNING)
store = Store(sys.argv[1])
spare = []
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    while True:
        spare.append(os.open("/dev/null", os.O_RDONLY))
except OSError as e:
    assert e.errno == errno.EMFILE
for claim in (store.claim, lambda name: store.recover()):
    try:
        claim("short")
    except OSError as e:
        print("raised", errno.errorcode[e.errno], type(e).__name__)
for fd in spare:
    os.close(fd)
hold = store.claim("short")
print("claimed" if hold is not None else "not claimed")
"""


def test_out_of_descriptors_a_lock_is_not_blamed_and_the_job_is_claimed_later(
    store: Store,
) -> None:
    put(store, "queue", "short")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    p = subprocess.run([sys.executable, "-c", SHORT_OF_DESCRIPTORS, str(store.root)], env=env,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    # the shortage itself is raised, for the caller to say so and try again later
    assert p.stdout.splitlines() == ["raised EMFILE OSError", "raised EMFILE OSError", "claimed"]
    assert "fix or remove" not in p.stderr
    assert (store.root / "processing" / "short").is_dir()
