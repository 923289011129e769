"""Cancel requests and deadlines: where a request is kept, how the holder learns of it.

A cancel request is the hidden file `.cancel` in the job folder (store.CANCEL_FILE),
written through the folder's descriptor. It moves with the job and outlives a crash or
restart of the processor holding it, so a job whose holder died after the request still
ends canceled: the processor that takes it next finds the file and sends the job to
error/ without running anything. Several processors (on several machines) may share a
root, so a request is never a signal to another process: the holder looks for the file
itself, one fstatat per running job every POLL seconds from one thread (the Watcher),
and once more before each task. inotify would not see other machines' writes.

A deadline is the JOB field `Deadline` (RFC 3339), or `--default-deadline` seconds from
the moment the job entered queue/. That moment is the job folder's ctime when it is
taken: a rename into queue/ sets it (mtime does not change on a rename), and nothing
else should change a queued folder (a job history made while a worker waits for a slot
does: events.entered_before_ready gives the time from before it). A job past its
deadline before it runs goes back to data/; one running then is stopped like a canceled
one and goes to error/.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from batchingest import fs, jobdir
from batchingest.jobfile import JOB_FILE, JobFile, JobFileError, now_rfc3339
from batchingest.store import BUSY, CANCEL_FILE, Job, JobBusy, State, Store

if TYPE_CHECKING:
    from batchingest.runner import TaskProcess, TaskResult

log = logging.getLogger("batchingest.control")

# Seconds between two looks at the running jobs' cancel files: the bulk of the latency
# from a request to the task being signalled.
POLL = 0.05
# Seconds the Watcher goes on looking after the last task it watched ended.
LINGER = 5.0
# A request holds one short JSON object; a bigger `.cancel` is not read, only obeyed.
REQUEST_LIMIT = 4096
API_REASON = "canceled through the API"
CANCELED = "CANCELED"
CANCEL_REQUESTED = "CANCEL_REQUESTED"
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"


class NotCancellable(Exception):
    """Only a queued or processing job can be canceled; `job` is where it is."""

    def __init__(self, job: Job) -> None:
        super().__init__(
            f"job {job.name!r} is {job.status}: only a queued or processing job can be canceled"
        )
        self.job = job


@dataclass(frozen=True)
class Stop:
    """Why a job is to be stopped: code CANCELED or DEADLINE_EXCEEDED, and the words."""

    code: str
    reason: str
    deadline: str = ""  # RFC 3339, for DEADLINE_EXCEEDED


@dataclass(frozen=True)
class Deadline:
    at: float  # seconds since the epoch
    text: str  # RFC 3339, as said in LOG and in the job's history
    own: bool  # the JOB's own Deadline (not --default-deadline)


def _record(
    store: Store, name: str, code: str, *, task: str | None = None, deadline: str = "",
    by: str = "api",
) -> None:  # fmt: skip
    """Put an event in the job's history (and a line in the service log)."""
    from batchingest import events, metrics  # both import the store: keep this module light

    what = f"task {task}" if task else f"deadline {deadline}" if deadline else ""
    log.info("job %s: %s%s", name, code, f" ({what})" if what else "")
    if code == CANCEL_REQUESTED:
        events.cancel_requested(store, name, by)
    elif code == CANCELED:
        events.canceled(store, name, task)
        metrics.cancel()
    elif code == DEADLINE_EXCEEDED:
        events.deadline_exceeded(store, name, deadline)
        metrics.cancel()


# -- deadlines -----------------------------------------------------------------------


def _rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_deadline(value: object) -> float:
    """The JOB field Deadline as seconds since the epoch; JobFileError if it is not a
    time with its zone (RFC 3339, e.g. 2026-12-01T18:00:00Z)."""
    at = None
    if isinstance(value, str) and len(value) <= 64:
        with contextlib.suppress(ValueError):
            at = datetime.fromisoformat(value)
    if at is None or at.tzinfo is None:
        shown = json.dumps(value)[:100]
        raise JobFileError(
            f"JOB field Deadline = {shown} is not an RFC 3339 time with a zone "
            "(e.g. 2026-12-01T18:00:00Z)"
        )
    return at.timestamp()


def deadline_of(job: JobFile, entered: float | None, default: float | None) -> Deadline | None:
    """The job's deadline: its own Deadline, else `default` seconds after `entered`."""
    if "Deadline" in job.extra and job.extra["Deadline"] is not None:
        at = parse_deadline(job.extra["Deadline"])
        return Deadline(at, _rfc3339(at), own=True)
    if default is None or entered is None:
        return None
    return Deadline(entered + default, _rfc3339(entered + default), own=False)


def entered_queue(store: Store, name: str) -> float | None:
    """When queue/NAME got there (its ctime, see the module's docstring); None if gone."""
    try:
        return os.stat(store.job_path(State.QUEUE, name), follow_symlinks=False).st_ctime
    except OSError:
        return None


def own_deadline_passed(store: Store, job: Job) -> str | None:
    """Why the job must not be queued: its own Deadline has passed (or is not a time).

    For the API's queue route; JOB is read through the job folder's descriptor.
    """
    try:
        fd = store.open_job(job)
        try:
            jf = jobdir.load_job(fd)
        finally:
            os.close(fd)
        deadline = deadline_of(jf, None, None)
    except JobFileError as e:
        return str(e)
    except OSError:
        return None  # moved meanwhile: the queue route answers for what it finds
    if deadline is not None and deadline.at <= time.time():
        return (
            f"job {job.name!r} has a Deadline that has passed ({deadline.text}): "
            "change or remove the Deadline in its JOB to run it again"
        )
    return None


# -- the request file ------------------------------------------------------------------


def write_request(dir_fd: int, reason: str) -> None:
    """Leave a cancel request in the job folder dir_fd (durably: it must outlive a crash)."""
    body = json.dumps({"Reason": reason, "Requested": now_rfc3339()}).encode() + b"\n"
    # a folder there already counts as a request, as anything named `.cancel` does
    with contextlib.suppress(IsADirectoryError):
        fs.write_atomic(dir_fd, CANCEL_FILE, body, mode=0o644)


def requested(dir_fd: int) -> str | None:
    """The reason of the job's cancel request, or None if there is none.

    Anything named `.cancel` counts; only a small regular file is read for its reason
    (never a link or a FIFO).
    """
    try:
        os.stat(CANCEL_FILE, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    try:
        raw = fs.read_file(dir_fd, CANCEL_FILE, REQUEST_LIMIT)
        data = json.loads(raw or b"{}")
    except (OSError, ValueError):
        return API_REASON
    reason = data.get("Reason") if isinstance(data, dict) else None
    return reason[:500] if isinstance(reason, str) and reason else API_REASON


def clear(dir_fd: int) -> None:
    """Remove the job's cancel request, done with (its job has left queue/ or processing/)."""
    with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
        os.unlink(CANCEL_FILE, dir_fd=dir_fd)


def check(dir_fd: int, deadline: Deadline | None, now: float | None = None) -> Stop | None:
    """Whether the job must stop now: a cancel request (first), or its deadline passed."""
    reason = requested(dir_fd)
    if reason is not None:
        return Stop(CANCELED, reason)
    if deadline is not None and deadline.at <= (time.time() if now is None else now):
        return Stop(DEADLINE_EXCEEDED, f"deadline {deadline.text} passed", deadline.text)
    return None


# -- the API's side ------------------------------------------------------------------


def request_cancel(store: Store, name: str, reason: str = API_REASON, *, by: str = "api") -> Job:
    """Cancel a queued or processing job; the job as it is now (for a 202).

    The request is left in the job folder first, so whoever holds or takes the job acts
    on it. A queued job is then taken back to data/ under its lock; if a processor is
    claiming it right then, that processor finds the request and cancels it into error/.
    NotCancellable for a job in data/, success/ or error/ (also one that got there
    while the request was being written: the request is then taken back).
    """
    for _ in range(3):
        job = store.get(name)
        if job.state not in BUSY:
            raise NotCancellable(job)
        try:
            fd = store.open_job(job)
        except FileNotFoundError:
            continue  # moved meanwhile: look again
        try:
            write_request(fd, reason)
            _record(store, name, CANCEL_REQUESTED, by=by)
            if job.state == State.QUEUE:
                back = store.unqueue(name)
                if back is not None:
                    clear(fd)
                    with contextlib.suppress(OSError, jobdir.LogError):
                        jobdir.append_log(fd, f"{reason} while queued: back to data/")
                    _record(store, name, CANCELED)
                    return back
            now = store.find(name)
            if now is not None and now.state in BUSY:
                # a holder in this process (or, through it, in the main process: see
                # apiprocs) need not wait for its next look; woken only now, so that the
                # stop it makes is not taken for the job having finished meanwhile
                wake_watchers()
                return now
            if now is not None and now.state == State.ERROR and _stopped_by_cancel(fd):
                return now  # a holder elsewhere (another process, host) was quicker
            clear(fd)  # it finished meanwhile: nothing is left to cancel
            raise NotCancellable(now or job)
        finally:
            os.close(fd)
    raise JobBusy(f"job {name!r} keeps changing state")


def _stopped_by_cancel(dir_fd: int) -> bool:
    """Whether the job's last task was recorded as canceled (by whoever held it)."""
    try:
        finished = jobdir.load_job(dir_fd).finished
    except (OSError, JobFileError):
        return False
    return bool(finished) and finished[-1].get("Status") == "canceled"


# -- the holder's side ---------------------------------------------------------------


def canceled_record(task: str, start: str, finish: str, reason: str) -> dict[str, object]:
    """The JOB `Finished` entry of a task stopped by a cancel request or a deadline."""
    return {"Name": task, "Start": start, "Finish": finish, "Status": "canceled", "Reason": reason}


def stop_job(store: Store, name: str, dir_fd: int, job: JobFile, stop: Stop, ran: bool) -> str:
    """Stop a held job before its next task; the state it goes to.

    A deadline that passed before the job ran here sends it back to data/, as it would
    have gone from queue/; otherwise the task it stopped at is recorded as canceled
    (and stays first in Todo, so moving the job back to queue/ resumes there) and the
    job goes to error/. JOB is saved before the move: a crash then still ends canceled.
    """
    task = job.todo[0]
    if stop.code == DEADLINE_EXCEEDED and not ran:
        _log(dir_fd, f"{stop.reason} before it ran: back to data/")
        _record(store, name, stop.code, task=task, deadline=stop.deadline)
        return State.DATA
    now = now_rfc3339()
    job.finished.append(canceled_record(task, now, now, stop.reason))
    jobdir.save_job(dir_fd, job)
    _log(dir_fd, f"{stop.reason}: job goes to error/ at task {task}")
    _record(store, name, stop.code, task=task, deadline=stop.deadline)
    return State.ERROR


def task_stopped(
    store: Store, name: str, dir_fd: int, job: JobFile, result: TaskResult, d: Deadline | None
) -> None:
    """Record a task the Watcher stopped: its Finished entry (JOB saved by the caller)."""
    stop = check(dir_fd, d) or Stop(CANCELED, result.reason)
    job.finished.append(canceled_record(result.task, result.start, result.finish, result.reason))
    _record(store, name, stop.code, task=result.task, deadline=stop.deadline)


def _log(dir_fd: int, text: str) -> None:
    with contextlib.suppress(OSError, jobdir.LogError):
        jobdir.append_log(dir_fd, text)


# The Watchers of this process: a request made here wakes them at once (other
# processes, and other machines, find the request at their next look).
_WATCHERS: weakref.WeakSet[Watcher] = weakref.WeakSet()


# An extra API process (batchingest.apiprocs) adds here how it wakes the main
# process's Watchers, which run this service's tasks.
WAKE_ELSEWHERE: list[Callable[[], None]] = []


def wake_watchers() -> None:
    for watcher in list(_WATCHERS):
        watcher.wake()
    for wake in WAKE_ELSEWHERE:
        wake()


class Watcher:
    """Stops running tasks whose job got a cancel request or passed its deadline.

    One thread looks at every watched job each POLL seconds (at once when a request
    is made in this process), under the lock that unwatch takes, so a job's folder
    descriptor is never used after unwatch returns. The thread starts with the first
    watch.
    """

    def __init__(self, grace: float, interval: float = POLL) -> None:
        self.grace = grace
        self.interval = interval
        self._lock = threading.Lock()
        self._jobs: dict[int, tuple[int, TaskProcess, Deadline | None]] = {}
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._asleep = True  # the thread waits for a watch without a timeout
        _WATCHERS.add(self)

    def watch(self, dir_fd: int, process: TaskProcess, deadline: Deadline | None) -> int:
        """Watch the job folder dir_fd while process runs; a key for unwatch."""
        key = id(process)
        with self._lock:
            idle = self._asleep
            self._jobs[key] = (dir_fd, process, deadline)
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(
                    target=self._loop, name="batchingest-cancel-watch", daemon=True
                )
                self._thread.start()
        if idle:
            self._wake.set()  # it sleeps without a timeout: let it look on
        return key

    def unwatch(self, key: int) -> None:
        with self._lock:
            self._jobs.pop(key, None)

    def wake(self) -> None:
        """Look now rather than at the next POLL."""
        self._wake.set()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        busy_until = 0.0
        while not self._closed.is_set():
            # Looks go on for LINGER s after the last task ran, so the next task's watch
            # need not wake this thread (short tasks one after another: a thread switch
            # each); no wake-ups at all once no task ran for that long.
            with self._lock:
                if self._jobs:
                    busy_until = time.monotonic() + LINGER
                self._asleep = time.monotonic() >= busy_until
            self._wake.wait(None if self._asleep else self.interval)
            self._wake.clear()
            if self._closed.is_set():
                return
            try:
                self.poll()
            except Exception:  # never expected; the watcher must not die of it
                log.exception("looking for cancel requests failed")

    def poll(self, now: float | None = None) -> None:
        """Look once at every watched job and stop those that must stop."""
        with self._lock:
            for dir_fd, process, deadline in self._jobs.values():
                if process.canceled:
                    continue
                try:
                    stop = check(dir_fd, deadline, now)
                except OSError:
                    continue
                if stop is not None:
                    process.stop(canceled=stop.reason, grace=self.grace)


class QueuedDeadlines:
    """Sends queued jobs past their deadline back to data/ (the processor, every poll).

    JOB of each queued job is read once and remembered with the identity of the folder
    (its ctime moves when it leaves queue/ and comes back) and of JOB (device, inode,
    size, mtime and ctime: replaced or written to), so a poll over a long queue costs an
    open beneath queue/, an fstat and an lstat a job, no path built. A job that
    entered queue/ less than `settle` seconds ago is left for the next poll: a claim
    checks the deadline too, and most jobs are claimed sooner than that, so their JOB
    is not read twice.
    """

    def __init__(self, store: Store, default: float | None, settle: float = 0.0) -> None:
        self.store = store
        self.default = default
        self.settle = settle
        self._seen: dict[str, tuple[tuple[object, ...], Deadline | None]] = {}

    def expire(self, now: float | None = None) -> list[str]:
        """Move every queued job past its deadline to data/; their names."""
        now = time.time() if now is None else now
        names = self.store.job_names(State.QUEUE)
        queued = set(names)
        self._seen = {n: v for n, v in self._seen.items() if n in queued}
        due = self._due(names, now)
        expired = []
        for name, deadline in due:
            job = self.store.unqueue(name)
            if job is None:
                continue  # being claimed: the processor checks the deadline there
            self._seen.pop(name, None)
            reason = f"deadline {deadline.text} passed"
            try:
                fd = self.store.open_job(job)
            except OSError:
                fd = -1
            if fd >= 0:
                _log(fd, f"{reason} while queued: back to data/")
                os.close(fd)
            _record(self.store, name, DEADLINE_EXCEEDED, deadline=deadline.text)
            log.info("job %s: %s while queued: back to data/", name, reason)
            expired.append(name)
        return expired

    def _due(self, names: list[str], now: float) -> list[tuple[str, Deadline]]:
        """The queued jobs whose deadline has passed, each opened beneath queue/ by name."""
        try:
            queue_fd = self.store.open_state_dir(State.QUEUE)
        except OSError:
            return []
        from batchingest.events import entered_before_ready  # (light: see _record)

        due = []
        try:
            for name in names:
                deadline = self._deadline(queue_fd, name, now, entered_before_ready)
                if deadline is not None and deadline.at <= now:
                    due.append((name, deadline))
        finally:
            os.close(queue_fd)
        return due

    def _deadline(
        self, queue_fd: int, name: str, now: float,
        entered: Callable[[Store, str, float | None], float | None],
    ) -> Deadline | None:  # fmt: skip
        try:
            fd = fs.open_dir(queue_fd, name)
        except (OSError, ValueError):
            return None  # taken meanwhile, or not a job
        try:
            st = os.fstat(fd)
            if now - st.st_ctime < self.settle:
                return None  # just queued: the claim, or the next poll, looks
            jst = fs.lstat(fd, JOB_FILE)
            # the folder's ctime changes when it is moved (left and came back); JOB's
            # identity when it is replaced or written to, even within one mtime tick
            job_key = jst and fs.version(jst)
            key = (st.st_dev, st.st_ino, st.st_ctime_ns, job_key)
            seen = self._seen.get(name)
            if seen is not None and seen[0] == key:
                return seen[1]
            try:
                # a history made ready here while a worker waits moved the ctime
                since = entered(self.store, name, st.st_ctime)
                deadline = deadline_of(jobdir.load_job(fd), since, self.default)
            except JobFileError:
                deadline = None  # the processor sends such a job to error/ when it takes it
            self._seen[name] = (key, deadline)
            return deadline
        except OSError:
            return None
        finally:
            os.close(fd)
