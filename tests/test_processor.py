"""The processor in-process: its Scheduler, and Processor.run on a real jobs root.

The Processor runs on its own event loop in a background thread, with real files, real
renames and real task processes; faults are real too (a state folder replaced by a
file makes every listing or rename there fail, as a sick file system would).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_service import make_job, wait_for, write_task

from batchingest import events, fs, lease
from batchingest.config import Config
from batchingest.health import Progress
from batchingest.processor import SHORTAGE_CAP_FOR, Processor, Scheduler
from batchingest.runner import TaskResult
from batchingest.store import Hold, Store

# -- the Scheduler ------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Listing:
    """What the scheduler's scan sees; raises `error` instead while it is set."""

    def __init__(self, *names: str) -> None:
        self.names = list(names)
        self.error: Exception | None = None
        self.calls = 0

    def __call__(self) -> list[str]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return list(self.names)


def take_now(s: Scheduler) -> str | None:
    """take() in a thread; None if it would block (nothing to hand out)."""
    got: list[str | None] = []
    t = threading.Thread(target=lambda: got.append(s.take()), daemon=True)
    t.start()
    t.join(0.5)
    if t.is_alive():
        s.close()  # release the blocked taker
        t.join(5)
        return None
    return got[0]


def test_take_hands_out_each_name_once_oldest_first() -> None:
    listing = Listing("a", "b")
    s = Scheduler(listing)
    assert s.take() == "a"
    assert s.take() == "b"
    # a and b are in flight; a rescan sees them again but does not hand them out
    s.wake()
    assert take_now(s) is None


def test_done_with_retry_keeps_a_name_back_until_then() -> None:
    clock = Clock()
    listing = Listing("a")
    s = Scheduler(listing, clock)
    assert s.take() == "a"
    s.done("a", retry_in=5)
    s.wake()
    assert take_now(s) is None
    clock.now += 6
    s = _reopened(s)
    s.wake()
    assert s.take() == "a"


def _reopened(s: Scheduler) -> Scheduler:
    # take_now closes a scheduler it found blocking; reopen it for the next step
    s._closed = False
    return s


def test_done_without_retry_lets_the_name_come_back_at_once() -> None:
    s = Scheduler(Listing("a"))
    assert s.take() == "a"
    s.done("a")
    s.wake()
    assert s.take() == "a"


def test_a_failing_listing_is_retried_with_backoff_and_never_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    listing = Listing("a")
    listing.error = OSError(24, "Too many open files")
    s = Scheduler(listing, clock)
    assert take_now(s) is None  # the error stayed inside
    assert listing.calls == 1
    assert s.scan_error is not None and "Too many open files" in s.scan_error
    assert not s.blind  # nobody waits for work right now
    assert "listing queue/ failed" in caplog.text
    s = _reopened(s)
    s.wake()
    assert take_now(s) is None
    assert listing.calls == 1, "listed again before the back-off was over"
    listing.error = None
    clock.now += 60
    s = _reopened(s)
    s.wake()
    assert s.take() == "a"
    assert s.scan_error is None


def test_blind_while_a_worker_waits_and_the_listing_fails() -> None:
    listing = Listing()
    listing.error = OSError(5, "Input/output error")
    s = Scheduler(listing)
    waiting = threading.Thread(target=s.take, daemon=True)
    waiting.start()
    wait_for(lambda: s.blind, 30, what="a blind scheduler")
    s.close()
    waiting.join(5)
    assert not s.blind


def test_pause_hands_out_nothing_until_it_ends() -> None:
    clock = Clock()
    s = Scheduler(Listing("a"), clock)
    s.pause(10)
    assert s.paused_for() == 10
    assert take_now(s) is None
    clock.now += 11
    assert s.paused_for() == 0
    s = _reopened(s)
    assert s.take() == "a"


def test_after_a_shortage_fewer_jobs_are_in_flight_until_jobs_go_through() -> None:
    """Workers that all take a job at once after a pause run short again together (four
    workers held four jobs and waited on each other for descriptors for good)."""
    clock = Clock()
    s = Scheduler(Listing("a", "b", "c", "d", "e", "f"), clock)
    assert [s.take() for _ in range(4)] == ["a", "b", "c", "d"]
    s.shortage()  # half of the four in flight, from now on
    s.done("a", retry_in=0)
    s.done("b", retry_in=0)
    s.done("c", retry_in=0)
    assert s.take() == "e"  # d and e: two in flight
    assert take_now(s) is None
    s = _reopened(s)
    s.went_through()  # one more
    assert s.take() == "f"
    assert take_now(s) is None
    s = _reopened(s)
    clock.now += SHORTAGE_CAP_FOR  # no shortage for that long: no cap
    s.wake()
    assert s.take() in ("a", "b", "c")


def test_close_releases_waiting_workers() -> None:
    s = Scheduler(Listing())
    got: list[str | None] = []
    threads = [threading.Thread(target=lambda: got.append(s.take())) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    s.close()
    for t in threads:
        t.join(5)
    assert got == [None, None, None]


# -- the Processor on a real root -----------------------------------------------------


class Running:
    """Processor.run on its own event loop in a thread, stopped at the end."""

    def __init__(self, cfg: Config, store: Store) -> None:
        self.progress = Progress()
        self.processor = Processor(cfg, store, self.progress)
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self.error: BaseException | None = None

    def _main(self) -> None:
        try:
            self._loop.run_until_complete(self.processor.run(self._stop))
        except BaseException as e:
            self.error = e

    def __enter__(self) -> Running:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive()
        self._loop.close()


@pytest.fixture
def cfg(root: Path) -> Config:
    return Config(root=root, poll_interval=0.1, grace=5)


@pytest.fixture
def running(cfg: Config, store: Store) -> Iterator[Running]:
    with Running(cfg, store) as r:
        yield r


def drop(root: Path, name: str, job: str | None = None) -> None:
    os.rename(make_job(root, name, job), root / "queue" / name)


def landed(root: Path, name: str) -> str | None:
    for state in ("success", "error"):
        if (root / state / name).is_dir():
            return state
    return None


def break_folder(root: Path, state: str) -> Path:
    """Replace a state folder by a plain file: every listing or rename there fails."""
    away = root / f".{state}-away"
    os.rename(root / state, away)
    (root / state).write_text("not a folder\n")
    return away


def mend_folder(root: Path, state: str, away: Path) -> None:
    (root / state).unlink()
    os.rename(away, root / state)


def test_jobs_run_in_process(root: Path, running: Running) -> None:
    write_task(root / "tasks", "start", 'echo addtask:two >> "$JOBCONTROL"\n')
    write_task(root / "tasks", "two", "echo two\n")
    for i in range(5):
        drop(root, f"j{i}")
    for i in range(5):
        assert wait_for(lambda i=i: landed(root, f"j{i}"), 20) == "success"
    data = json.loads((root / "success" / "j0" / "JOB").read_text())
    assert [f["Name"] for f in data["Finished"]] == ["start", "two"]
    wait_for(lambda: "processor" in running.progress._due, 30, what="a heartbeat")
    assert running.progress.stale() == []


def test_a_finished_job_queued_again_says_it_runs_nothing(root: Path, running: Running) -> None:
    write_task(root / "tasks", "start", "echo ran >> ran.txt\n")
    done = '{"Todo": [], "Finished": [{"Name": "start", "Status": "ok"}]}'
    drop(root, "again", done)
    assert wait_for(lambda: landed(root, "again"), 20) == "success"
    assert not (root / "success" / "again" / "ran.txt").exists()
    assert (
        "nothing to run: every task in JOB is finished"
        in (root / "success" / "again" / "LOG").read_text()
    )


def test_a_failing_queue_listing_does_not_kill_the_workers(
    root: Path, cfg: Config, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    write_task(root / "tasks", "start", "true\n")
    caplog.set_level(logging.WARNING, "batchingest.processor")
    running = Running(cfg, store)
    running.processor.stale_after = 0.5
    with running:
        away = break_folder(root, "queue")
        wait_for(lambda: "listing queue/ failed" in caplog.text, 10, what="a failed listing")
        # idle workers that cannot see queue/: no heartbeat, so /readyz would fail
        wait_for(lambda: running.progress.stale() == ["processor"], 10, what="a stale beat")
        mend_folder(root, "queue", away)
        drop(root, "after")
        assert wait_for(lambda: landed(root, "after"), 20, what="the job after the fault")
        threads = running.processor._threads
        assert threads and all(t.is_alive() for t in threads)
        wait_for(lambda: running.progress.stale() == [], 40, what="the heartbeat to come back")
    assert running.error is None


def test_a_failing_recovery_scan_keeps_the_poll_loop_and_withholds_the_heartbeat(
    root: Path, cfg: Config, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    write_task(root / "tasks", "start", "true\n")
    caplog.set_level(logging.WARNING, "batchingest.processor")
    r = Running(cfg, store)
    r.processor.stale_after = 0.5
    with r:
        wait_for(lambda: "processor" in r.progress._due, 30, what="a first heartbeat")
        away = break_folder(root, "processing")
        wait_for(lambda: r.progress.stale() == ["processor"], 10, what="a stale heartbeat")
        # under load the beat can go stale (0.5 s) before the failing scan has logged
        wait_for(lambda: "recovery scan of processing/ failed" in caplog.text, 30,
                 what="the failed scan in the log")  # fmt: skip
        mend_folder(root, "processing", away)
        wait_for(lambda: r.progress.stale() == [], 10, what="the heartbeat to come back")
        drop(root, "after")
        assert wait_for(lambda: landed(root, "after"), 20) == "success"


def held(path: Path) -> bool:
    """Whether someone holds the job's lock (as the processor does while it owns it): on
    the local file system of the tests, a flock on the job folder itself."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_failing_finish_keeps_the_job_held_and_retries(
    root: Path, running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    write_task(root / "tasks", "start", "echo ran >> ran.txt\n")
    caplog.set_level(logging.WARNING, "batchingest.processor")
    away = break_folder(root, "success")
    drop(root, "j")
    job = root / "processing" / "j"
    wait_for(lambda: "cannot move it to success/" in caplog.text, 20, what="a failed finish")
    # held all along: no recovery may take it back to queue/ and run it again
    for _ in range(10):
        assert job.is_dir() and held(job)
        time.sleep(0.1)
    assert "finish j" in running.processor._failing  # no heartbeat meanwhile
    mend_folder(root, "success", away)
    assert wait_for(lambda: landed(root, "j"), 40) == "success"
    assert (root / "success" / "j" / "ran.txt").read_text() == "ran\n"


def test_a_job_that_cannot_be_claimed_is_not_retried_in_a_loop(
    root: Path, cfg: Config, shared_fs_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A job whose .lock is a folder (on a shared file system, where jobs are held by
    `.lock`) makes every claim fail: one try, then a long wait."""
    write_task(root / "tasks", "start", "true\n")
    caplog.set_level(logging.WARNING, "batchingest.processor")
    caplog.set_level(logging.WARNING, "batchingest.store")
    build = make_job(root, "bad")
    (build / ".lock").mkdir()
    os.rename(build, root / "queue" / "bad")
    with Running(cfg, shared_fs_store):
        drop(root, "good")
        assert wait_for(lambda: landed(root, "good"), 20) == "success"
        time.sleep(1.0)  # ten polls
    # said once, by whichever layer found it (the store skips a job whose .lock it
    # cannot use; a claim that raises is retried only after a long wait)
    said = caplog.text.count("job bad: cannot claim it") + caplog.text.count(
        "skipping queue/bad: its .lock is a folder"
    )
    assert said == 1, caplog.text
    assert (root / "queue" / "bad").is_dir()


def test_a_task_finds_its_job_folder_locked_and_locks_a_file_of_its_own(
    root: Path, running: Running
) -> None:
    """As the README says under Tasks: the service holds the job folder's lock while a
    task runs, so `flock -n .` is busy; a lock file of the task's own is free."""
    write_task(
        root / "tasks",
        "start",
        "if flock -n . true; then echo folder-free; else echo folder-busy; fi > folder.txt\n"
        "flock -n my.lock echo own-free > own.txt\n",
    )
    drop(root, "j")
    assert wait_for(lambda: landed(root, "j"), 20) == "success"
    assert (root / "success" / "j" / "folder.txt").read_text() == "folder-busy\n"
    assert (root / "success" / "j" / "own.txt").read_text() == "own-free\n"


@pytest.mark.parametrize("shared_root", [False, True])
def test_a_local_root_used_by_other_hosts_is_said_to_need_shared_root(
    root: Path, store: Store, caplog: pytest.LogCaptureFixture, shared_root: bool
) -> None:
    """Another host's lease on a job, and its probe file: the root is exported to
    machines that see it as shared, so this one needs --shared-root too."""
    os.rename(make_job(root, "theirs"), root / "processing" / "theirs")
    dir_fd = os.open(root / "processing" / "theirs", os.O_RDONLY | os.O_DIRECTORY)
    try:
        other = lease.Owner("elsewhere", "their-boot", 1)
        got = lease.acquire(dir_fd, other, 60, lambda: time.time(), True)
        assert got is not None
        got.held.close()
    finally:
        os.close(dir_fd)
    (root / lease.clock_name("far.example")).write_text("now\n")
    cfg = Config(root=root, poll_interval=0.1, grace=5, shared_root=shared_root)
    with caplog.at_level(logging.WARNING, "batchingest.processor"), Running(cfg, store):
        pass  # the look is made before the processor runs its first job
    said = [r.getMessage() for r in caplog.records if "--shared-root" in r.getMessage()]
    if shared_root:
        assert said == []
    else:
        assert len(said) == 1 and "(elsewhere, far.example)" in said[0]
    assert (root / "processing" / "theirs" / ".lease").exists()  # a live lease: left alone


def test_started_is_set_once_the_first_round_has_recovered_processing(
    root: Path, cfg: Config, store: Store
) -> None:
    """`started` (the service gives the C heap's free pages back then) comes after the
    worker threads and the first recovery scan: a job a dead service left in
    processing/ is back in queue/ or claimed again by then, and runs."""
    write_task(root / "tasks", "start", "true\n")
    os.rename(make_job(root, "left"), root / "processing" / "left")
    running = Running(cfg, store)
    assert not running.processor.started.is_set()
    with running:
        wait_for(running.processor.started.is_set, 10, what="the first round")
        threads = running.processor._threads
        assert threads and all(t.is_alive() for t in threads)
        assert running.progress.stale() == []  # the round's heartbeat came first
        assert wait_for(lambda: landed(root, "left"), 20, what="the recovered job") == "success"
    assert running.error is None


def test_worker_threads_are_started_as_jobs_come(
    root: Path, cfg: Config, store: Store, tmp_path: Path
) -> None:
    """An idle processor has one worker thread; a job taken starts another, so two jobs
    run side by side (each task waits for the other's), up to 2 x --workers + 2."""
    met = tmp_path / "met"
    met.mkdir()
    write_task(root / "tasks", "start", f"""touch "{met}/$JOBNAME"
n=0
while [ "$(ls "{met}" | wc -l)" -lt 2 ] && [ $n -lt 400 ]; do sleep 0.05; n=$((n+1)); done
[ "$(ls "{met}" | wc -l)" -ge 2 ]
""")  # fmt: skip
    with Running(cfg, store) as running:
        wait_for(running.processor.started.is_set, 10, what="the first round")
        time.sleep(0.5)  # polls of an empty queue/ start no thread
        assert len(running.processor._threads) == 1
        drop(root, "a")
        drop(root, "b")
        assert wait_for(lambda: landed(root, "a"), 30, what="a") == "success"
        assert wait_for(lambda: landed(root, "b"), 30, what="b") == "success"
        threads = running.processor._threads
        assert 2 <= len(threads) <= 2 * cfg.workers + 2
        assert all(t.is_alive() for t in threads)
    assert sorted(p.name for p in met.iterdir()) == ["a", "b"]
    assert running.error is None


@pytest.mark.parametrize("shared_root", [False, True])
def test_the_lease_renewer_runs_from_the_start_only_where_leases_are_made(
    root: Path, store: Store, shared_root: bool
) -> None:
    cfg = Config(root=root, poll_interval=0.1, grace=5, shared_root=shared_root)
    with Running(cfg, store) as running:
        wait_for(running.processor.started.is_set, 10, what="the first round")
        assert running.processor._leases._thread.is_alive() is shared_root
        names = [t.name for t in running.processor._threads]
        assert len(names) == len(set(names)) == 1
    assert running.error is None


def test_a_jobs_slot_is_free_once_its_last_task_ends(
    root: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one slot: a task that is not the job's last keeps it while its event is
    written; the last one, or a failed one, frees it first (the next job need not wait
    for the event or the JOB save)."""
    write_task(root / "tasks", "start", "echo one\n")
    write_task(root / "tasks", "two", "echo two\n")
    write_task(root / "tasks", "bad", "exit 1\n")
    free_at_end: list[tuple[str, int]] = []
    real = events.task_ended

    def task_ended(store: Store, hold: Hold, result: TaskResult) -> None:
        free_at_end.append((result.task, slots._value))  # type: ignore[attr-defined]
        real(store, hold, result)

    monkeypatch.setattr(events, "task_ended", task_ended)
    recorder = events.Recorder(store)
    recorder.attach()
    try:
        with Running(Config(root=root, poll_interval=0.1, grace=5, workers=1), store) as r:
            slots = r.processor._slots
            drop(root, "a", '{"Todo": ["start", "two"]}')
            assert wait_for(lambda: landed(root, "a"), 20) == "success"
            drop(root, "b", '{"Todo": ["bad", "two"]}')
            assert wait_for(lambda: landed(root, "b"), 20) == "error"
    finally:
        recorder.close()
    assert free_at_end == [("start", 0), ("two", 1), ("bad", 1)]
    folder = fs.open_root(root / "success" / "a")
    try:
        codes = [e["code"] for e in events.read_history(folder)]
    finally:
        os.close(folder)
    assert codes == ["QUEUED", "CLAIMED", "TASK_STARTED", "TASK_SUCCEEDED", "TASK_STARTED",
                     "TASK_SUCCEEDED", "SUCCEEDED"]  # fmt: skip
