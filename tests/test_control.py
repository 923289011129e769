"""Cancel requests and deadlines in-process: the request file, the Watcher stopping real
task processes, and the processor acting on requests and deadlines on a real root.

Every path here is inside the test's own tmp_path.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from live_service import alive, make_job, rfc3339, wait_for, write_task
from test_processor import Running

from batchingest import control, events, fs
from batchingest.config import Config
from batchingest.jobfile import JobFile, JobFileError
from batchingest.runner import TaskProcess
from batchingest.store import CANCEL_FILE, Store


def job_dir_fd(path: Path) -> int:
    return fs.open_root(path)


# -- deadlines ----------------------------------------------------------------------


def test_a_deadline_is_an_rfc3339_time_with_its_zone() -> None:
    assert (
        control.parse_deadline("2026-12-01T18:00:00Z")
        == datetime(2026, 12, 1, 18, tzinfo=UTC).timestamp()
    )
    assert control.parse_deadline("2026-12-01T19:00:00+01:00") == control.parse_deadline(
        "2026-12-01T18:00:00Z"
    )
    for bad in ("2026-12-01T18:00:00", "tomorrow", 1765000000, "", ["x"], "9" * 100):
        with pytest.raises(JobFileError, match="Deadline"):
            control.parse_deadline(bad)


def test_the_jobs_own_deadline_wins_over_the_default() -> None:
    own = JobFile(extra={"Deadline": "2026-12-01T18:00:00Z"})
    d = control.deadline_of(own, entered=100.0, default=5.0)
    assert d is not None and d.own and d.text == "2026-12-01T18:00:00.000Z"
    d = control.deadline_of(JobFile(), entered=100.0, default=5.0)
    assert d is not None and (d.at, d.own) == (105.0, False)
    assert control.deadline_of(JobFile(), entered=100.0, default=None) is None
    assert control.deadline_of(JobFile(extra={"Deadline": None}), None, None) is None


# -- the request file ------------------------------------------------------------------


def test_a_request_is_written_read_and_cleared_through_the_folder(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    fd = job_dir_fd(job)
    try:
        assert control.requested(fd) is None
        assert control.check(fd, None) is None
        control.write_request(fd, "because")
        assert json.loads((job / CANCEL_FILE).read_text())["Reason"] == "because"
        assert control.requested(fd) == "because"
        deadline = control.Deadline(0.0, "1970-01-01T00:00:00.000Z", own=True)
        # a request wins over a deadline that passed too
        assert control.check(fd, deadline) == control.Stop(control.CANCELED, "because")
        control.clear(fd)
        assert not (job / CANCEL_FILE).exists()
        assert control.check(fd, deadline) == control.Stop(
            control.DEADLINE_EXCEEDED,
            "deadline 1970-01-01T00:00:00.000Z passed",
            "1970-01-01T00:00:00.000Z",
        )
        assert control.check(fd, deadline, now=-1.0) is None
    finally:
        os.close(fd)


def test_a_planted_link_or_fifo_counts_as_a_request_and_is_never_followed(
    tmp_path: Path,
) -> None:
    job = tmp_path / "job"
    job.mkdir()
    target = tmp_path / "elsewhere.txt"
    target.write_text('{"Reason": "from outside the job"}')
    (job / CANCEL_FILE).symlink_to(target)
    fd = job_dir_fd(job)
    try:
        assert control.requested(fd) == control.API_REASON  # not the target's words
        control.write_request(fd, "x")  # replaces the link, never writes through it
        assert target.read_text() == '{"Reason": "from outside the job"}'
        control.clear(fd)
        os.mkfifo(job / CANCEL_FILE)
        done: list[str | None] = []
        t = threading.Thread(target=lambda: done.append(control.requested(fd)), daemon=True)
        t.start()
        t.join(5)
        assert done == [control.API_REASON]  # answered, never blocked on the FIFO
        control.clear(fd)
        assert not os.path.lexists(job / CANCEL_FILE)
        assert target.exists()
    finally:
        os.close(fd)


# -- the Watcher stops real task processes --------------------------------------------

STUBBORN = """
trap 'echo TERM ignored' TERM
sh -c 'trap "" TERM; echo $$ > grandchild.pid; while :; do sleep 1; done' &
echo $$ > task.pid
while :; do sleep 0.05; done
"""


def run_in_thread(process: TaskProcess, job: Path, script: str) -> list[int]:
    (job / "task").write_text("#!/bin/sh\n" + script)
    (job / "task").chmod(0o755)
    codes: list[int] = []
    log_fd = os.open(job / "LOG", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    hold_fd = os.open(job, os.O_RDONLY)

    def run() -> None:
        try:
            code = process.run(
                [str(job / "task")],
                job_dir=job,
                job_name="j",
                control=job.parent / "control",
                env=dict(os.environ),
                log_fd=log_fd,
                hold_fd=hold_fd,
                timeout=None,
            )
            codes.append(code)
        finally:
            os.close(log_fd)
            os.close(hold_fd)

    threading.Thread(target=run, daemon=True).start()
    return codes


def test_the_watcher_kills_a_task_that_ignores_sigterm_with_its_grandchildren(
    tmp_path: Path,
) -> None:
    job = tmp_path / "job"
    job.mkdir()
    fd = job_dir_fd(job)
    watcher = control.Watcher(grace=0.5, interval=0.02)
    process = TaskProcess()
    key = watcher.watch(fd, process, None)
    try:
        codes = run_in_thread(process, job, STUBBORN)
        # the shell makes a pid file before it writes the pid into it: wait for the pids
        written = [job / "grandchild.pid", job / "task.pid"]
        wait_for(lambda: all(p.exists() and p.read_text().strip() for p in written), 10)
        task = int((job / "task.pid").read_text())
        grandchild = int((job / "grandchild.pid").read_text())
        time.sleep(0.2)
        assert codes == [] and process.canceled == ""  # nothing asked yet
        control.write_request(fd, "stop it")
        t0 = time.monotonic()
        wait_for(lambda: codes, 10, what="the task to end")
        elapsed = time.monotonic() - t0
        assert codes == [-signal.SIGKILL]  # TERM was trapped: KILL after the grace
        assert 0.4 <= elapsed < 3.0
        assert process.canceled == "stop it"
        assert "TERM ignored" in (job / "LOG").read_text()
        wait_for(lambda: not alive(task) and not alive(grandchild), 30, what="the group gone")
    finally:
        watcher.unwatch(key)
        watcher.close()
        os.close(fd)


def test_a_request_made_in_this_process_wakes_the_watcher_at_once(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    fd = job_dir_fd(job)
    watcher = control.Watcher(grace=5, interval=60)  # its own look would come far too late
    process = TaskProcess()
    watcher.watch(fd, process, None)
    try:
        codes = run_in_thread(process, job, "echo $$ > pid; exec sleep 30\n")
        wait_for((job / "pid").exists, 10)
        time.sleep(0.2)  # asleep again after the wake-up of its first watch
        control.write_request(fd, "now")
        control.wake_watchers()
        wait_for(lambda: codes, 30, what="the task to end")  # its own look: in 60 s
        assert codes == [-signal.SIGTERM] and process.canceled == "now"
    finally:
        watcher.close()
        os.close(fd)


def test_a_watch_soon_after_another_is_looked_at_without_a_wake(tmp_path: Path) -> None:
    first, job = tmp_path / "first", tmp_path / "job"
    first.mkdir()
    job.mkdir()
    first_fd, fd = job_dir_fd(first), job_dir_fd(job)
    watcher = control.Watcher(grace=5, interval=0.02)
    try:
        watcher.unwatch(watcher.watch(first_fd, TaskProcess(), None))  # a task that ended
        time.sleep(0.2)  # the watcher goes on looking (control.LINGER), not woken again
        process = TaskProcess()
        watcher.watch(fd, process, None)
        codes = run_in_thread(process, job, "echo $$ > pid; exec sleep 30\n")
        wait_for((job / "pid").exists, 10)
        control.write_request(fd, "stop")  # no wake_watchers(): its own look finds it
        wait_for(lambda: codes, 10, what="the task to end")
        assert codes == [-signal.SIGTERM] and process.canceled == "stop"
    finally:
        watcher.close()
        os.close(fd)
        os.close(first_fd)


def test_the_watcher_stops_a_task_at_its_deadline(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    fd = job_dir_fd(job)
    watcher = control.Watcher(grace=5, interval=0.02)
    process = TaskProcess()
    at = time.time() + 0.5
    watcher.watch(fd, process, control.Deadline(at, "then", own=True))
    try:
        codes = run_in_thread(process, job, "exec sleep 30\n")
        wait_for(lambda: codes, 10, what="the task to end")
        assert time.time() >= at
        assert codes == [-signal.SIGTERM]
        assert process.canceled == "deadline then passed"
    finally:
        watcher.close()
        os.close(fd)


# -- the processor on a real root -----------------------------------------------------


@pytest.fixture
def cfg(root: Path) -> Config:
    return Config(root=root, poll_interval=0.1, grace=5, cancel_grace=1, workers=1)


@pytest.fixture
def running(cfg: Config, store: Store) -> Iterator[Running]:
    with Running(cfg, store) as r:
        yield r


def drop(root: Path, name: str, job: str | None = None, dot_cancel: bool = False) -> None:
    build = make_job(root, name, job)
    if dot_cancel:
        (build / CANCEL_FILE).write_text('{"Reason": "asked before it ran"}')
    os.rename(build, root / "queue" / name)


def job_json(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((path / "JOB").read_text())  # type: ignore[no-any-return]


def test_a_job_taken_with_a_request_goes_to_error_without_running(
    root: Path, running: Running
) -> None:
    write_task(root / "tasks", "start", "echo ran >> ran.txt\n")
    drop(root, "asked", dot_cancel=True)
    job = root / "error" / "asked"
    wait_for(job.is_dir, 20, what="the job in error/")
    assert not (job / "ran.txt").exists()
    data = job_json(job)
    assert data["Todo"] == ["start"]  # moving it back to queue/ resumes at start
    (entry,) = data["Finished"]
    assert (entry["Name"], entry["Status"]) == ("start", "canceled")
    assert entry["Reason"] == "asked before it ran"
    assert not (job / CANCEL_FILE).exists()  # done with: a requeue runs the job
    os.rename(job, root / "queue" / "asked")
    wait_for((root / "success" / "asked").is_dir, 20, what="the requeued job to succeed")
    assert (root / "success" / "asked" / "ran.txt").read_text() == "ran\n"


def test_a_running_job_is_canceled_through_the_store(
    root: Path, store: Store, running: Running
) -> None:
    write_task(root / "tasks", "start", 'echo addtask:second >> "$JOBCONTROL"\n')
    write_task(root / "tasks", "second", "echo started > started; exec sleep 30\n")
    drop(root, "long")
    wait_for((root / "processing" / "long" / "started").exists, 20, what="second to start")
    job = control.request_cancel(store, "long")
    assert job.status == "processing"
    wait_for((root / "error" / "long").is_dir, 10, what="the job in error/")
    data = job_json(root / "error" / "long")
    assert data["Todo"] == ["second"]
    assert [f["Status"] for f in data["Finished"]] == ["ok", "canceled"]
    assert data["Finished"][1]["Reason"] == "canceled through the API"
    assert (
        "---- task second: canceled, canceled through the API"
        in (root / "error" / "long" / "LOG").read_text()
    )
    with pytest.raises(control.NotCancellable, match="is error"):
        control.request_cancel(store, "long")
    assert not (root / "error" / "long" / CANCEL_FILE).exists()


def test_a_queued_job_goes_back_to_data(root: Path, store: Store) -> None:
    drop(root, "waiting")  # no processor runs: it stays queued
    job = control.request_cancel(store, "waiting")
    assert (job.status, job.path) == ("ready", root / "data" / "waiting")
    assert not (root / "data" / "waiting" / CANCEL_FILE).exists()
    assert not (root / "data" / "waiting" / ".lock").exists()
    assert (
        "canceled through the API while queued" in (root / "data" / "waiting" / "LOG").read_text()
    )
    with pytest.raises(control.NotCancellable, match="is ready"):
        control.request_cancel(store, "waiting")


def test_a_queued_job_being_claimed_keeps_its_request(root: Path, store: Store) -> None:
    """A processor holds the queued job (it is claiming it): the request stays for it."""
    drop(root, "taken")
    hold = store._hold("queue", "taken")
    assert hold is not None
    try:
        job = control.request_cancel(store, "taken")
        assert job.status == "queue"
        assert (root / "queue" / "taken" / CANCEL_FILE).exists()
    finally:
        hold.release()


def test_deadline_passed_before_running_sends_the_job_back_to_data(
    root: Path, running: Running
) -> None:
    write_task(root / "tasks", "start", "echo ran >> ran.txt\n")
    text = json.dumps({"Todo": ["start"], "Deadline": rfc3339(-60)})
    drop(root, "late", text)
    job = root / "data" / "late"
    wait_for(job.is_dir, 20, what="the job back in data/")
    assert not (job / "ran.txt").exists()
    assert (job / "JOB").read_text() == text  # as it was: change the Deadline to run it
    # taken back by the poll, or by the claim if that came first
    assert "passed" in (log := (job / "LOG").read_text()) and "back to data/" in log


def test_a_claim_checks_the_deadline_before_running(root: Path, store: Store) -> None:
    """The claim's own check, with no poll in between (a job moved in by hand)."""
    from batchingest.processor import Processor

    write_task(root / "tasks", "start", "echo ran >> ran.txt\n")
    drop(root, "late", json.dumps({"Todo": ["start"], "Deadline": rfc3339(-60)}))
    processor = Processor(Config(root=root), store)
    assert processor.perform("late") is None
    job = root / "data" / "late"
    assert job.is_dir() and not (job / "ran.txt").exists()
    assert "passed before it ran: back to data/" in (job / "LOG").read_text()


def test_a_bad_deadline_sends_the_job_to_error_with_the_reason(
    root: Path, running: Running
) -> None:
    write_task(root / "tasks", "start", "echo ran >> ran.txt\n")
    drop(root, "odd", json.dumps({"Todo": ["start"], "Deadline": "soon"}))
    job = root / "error" / "odd"
    wait_for(job.is_dir, 20, what="the job in error/")
    assert not (job / "ran.txt").exists()
    assert 'Deadline = "soon" is not an RFC 3339 time' in (job / "LOG").read_text()


def test_queued_jobs_past_their_deadline_go_back_to_data(root: Path, store: Store) -> None:
    drop(root, "past", json.dumps({"Todo": ["start"], "Deadline": rfc3339(-1)}))
    drop(root, "future", json.dumps({"Todo": ["start"], "Deadline": rfc3339(3600)}))
    drop(root, "none")
    drop(root, "broken", "{not json")
    deadlines = control.QueuedDeadlines(store, default=None)
    assert deadlines.expire() == ["past"]
    assert (root / "data" / "past").is_dir()
    assert "while queued: back to data/" in (root / "data" / "past" / "LOG").read_text()
    assert sorted(os.listdir(root / "queue")) == ["broken", "future", "none"]
    # the default counts from entering queue/ (the folder's ctime)
    deadlines = control.QueuedDeadlines(store, default=30)
    assert deadlines.expire() == []
    assert deadlines.expire(now=time.time() + 31) == ["none"]  # future has its own
    assert sorted(os.listdir(root / "queue")) == ["broken", "future"]


def test_a_job_queued_just_now_is_left_for_the_next_poll(root: Path, store: Store) -> None:
    """Within `settle` seconds of entering queue/ its JOB is not read (a claim looks)."""
    drop(root, "past", json.dumps({"Todo": ["start"], "Deadline": rfc3339(-1)}))
    deadlines = control.QueuedDeadlines(store, default=None, settle=60)
    assert deadlines.expire() == []
    assert (root / "queue" / "past").is_dir()
    assert deadlines.expire(now=time.time() + 61) == ["past"]
    assert (root / "data" / "past").is_dir()


def test_leftover_requests_of_finished_jobs_are_swept(root: Path, store: Store) -> None:
    for state in ("data", "error", "success", "queue"):
        (root / state / f"in-{state}").mkdir()
        (root / state / f"in-{state}" / CANCEL_FILE).write_text("{}")
    assert store.sweep_jobs() == 3
    assert (root / "queue" / "in-queue" / CANCEL_FILE).exists()  # still to be acted on
    for state in ("data", "error", "success"):
        assert not (root / state / f"in-{state}" / CANCEL_FILE).exists()


def test_a_queued_jobs_deadline_is_read_again_when_its_job_changes(
    root: Path, store: Store
) -> None:
    """JOB is read once and remembered; a deadline added later is still honoured."""
    for name in ("later", "replaced"):
        drop(root, name, json.dumps({"Todo": ["start"]}))
    deadlines = control.QueuedDeadlines(store, default=None)
    assert deadlines.expire() == []  # both seen: no deadline
    job = root / "queue" / "later" / "JOB"
    stamp = job.stat().st_mtime_ns
    with job.open("r+") as f:  # written in place, its mtime put back: its ctime moved
        f.write(json.dumps({"Todo": ["start"], "Deadline": rfc3339(-1)}))
    os.utime(job, ns=(stamp, stamp))
    fresh = root.parent / "JOB.new"
    fresh.write_text(json.dumps({"Todo": ["start"], "Deadline": rfc3339(-1)}))
    os.replace(fresh, root / "queue" / "replaced" / "JOB")  # a new file in its place
    assert sorted(deadlines.expire()) == ["later", "replaced"]
    assert sorted(os.listdir(root / "data")) == ["later", "replaced"]


def test_a_job_that_leaves_queue_and_comes_back_is_read_again(root: Path, store: Store) -> None:
    drop(root, "back")
    deadlines = control.QueuedDeadlines(store, default=None)
    assert deadlines.expire() == []
    os.rename(root / "queue" / "back", root / "error" / "back")
    assert deadlines.expire() == []  # gone: forgotten
    (root / "error" / "back" / "JOB").write_text(
        json.dumps({"Todo": ["start"], "Deadline": rfc3339(-1)})
    )
    os.rename(root / "error" / "back", root / "queue" / "back")
    assert deadlines.expire() == ["back"]


def test_the_default_deadline_counts_from_entering_queue_again(root: Path, store: Store) -> None:
    """A job seen queued, moved out and back, has its default counted from its return."""
    drop(root, "again")
    deadlines = control.QueuedDeadlines(store, default=30)
    first = (root / "queue" / "again").stat().st_ctime
    assert deadlines.expire(now=first + 29) == []
    time.sleep(0.05)
    os.rename(root / "queue" / "again", root / "data" / "again")
    os.rename(root / "data" / "again", root / "queue" / "again")
    back = (root / "queue" / "again").stat().st_ctime
    assert back > first
    assert deadlines.expire(now=first + 30.01) == []  # 30 s from its return, not before
    assert deadlines.expire(now=back + 31) == ["again"]


def test_a_history_made_ready_moves_neither_queue_order_nor_deadline(
    root: Path, store: Store
) -> None:
    """A worker waiting for a slot makes the job's history: a new name in the folder,
    which moves its ctime. The queue's order (the folder's mtime) is kept, and the
    default deadline still counts from when the job entered queue/."""
    drop(root, "waits")
    folder = root / "queue" / "waits"
    before = folder.stat()
    recorder = events.Recorder(store)
    recorder.attach()
    try:
        time.sleep(0.05)
        events.ready(store, "waits")
        after = folder.stat()
        assert (folder / events.EVENTS_FILE).exists()
        assert after.st_mtime_ns == before.st_mtime_ns
        assert after.st_ctime > before.st_ctime
        assert events.entered_before_ready(store, "waits", after.st_ctime) == before.st_ctime
        deadlines = control.QueuedDeadlines(store, default=30)
        assert deadlines.expire(now=before.st_ctime + 29.99) == []
        assert deadlines.expire(now=before.st_ctime + 30.01) == ["waits"]
    finally:
        recorder.close()


def test_a_job_queued_again_while_its_worker_waited_counts_from_its_return(
    root: Path, store: Store
) -> None:
    drop(root, "again")
    folder = root / "queue" / "again"
    first = folder.stat().st_ctime
    recorder = events.Recorder(store)
    recorder.attach()
    try:
        events.ready(store, "again")
        time.sleep(0.05)
        os.rename(folder, root / "data" / "again")  # canceled, or moved by hand
        os.rename(root / "data" / "again", folder)  # and queued again
        back = folder.stat().st_ctime
        assert back > first
        assert events.entered_before_ready(store, "again", back) == back
        assert control.QueuedDeadlines(store, default=30).expire(now=first + 30.01) == []
    finally:
        recorder.close()
