"""Transfer requests as jobs: the request and progress documents, states, cancel.

Every Globus transfer or delete task and every Staccato transfer is an ordinary job named
by its id, with `{"Todo": ["transfer"]}` and these files, all reached through the job
folder's descriptor (batchingest.fs):

  TRANSFER.json           the request, written once by the API (endpoint *names* and paths
                          on them; the task takes the endpoint folders from its settings)
  TRANSFER-PROGRESS.json  counters, rewritten atomically by the transfer task
  TRANSFERRED             one JSON line per file copied (successful_transfers)
  .cancel                 a cancel request (also read by the processor's cancel, see README)
  STACCATO-DELETED        a Staccato transfer deleted by its client

The state of a transfer is the job's state (its folder) plus these files; nothing else is
kept anywhere, so a restart, a `mv` by hand or a second API process see the same thing.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from batchingest import fs

# The transfer task, which starts once per request, needs only the files' names and
# readers of this module; the store and the JOB file are imported where they are used.
if TYPE_CHECKING:
    from batchingest.store import Job, State, Store

REQUEST = "TRANSFER.json"
PROGRESS = "TRANSFER-PROGRESS.json"
TRANSFERRED = "TRANSFERRED"
CANCEL = ".cancel"
DELETED = "STACCATO-DELETED"
TASK = "transfer"
MAX_REQUEST = 16 << 20
MAX_PROGRESS = 1 << 20
# submission ids name their task: the same submission id always gives the same task id
_SUBMISSIONS = uuid.UUID("6f1d3a52-4c8e-5b8a-9f0e-7d1c2b3a4e5f")

COUNTERS = ("files", "directories", "files_skipped", "files_transferred", "bytes_transferred",
            "bytes_checksummed", "subtasks_total", "subtasks_succeeded", "subtasks_failed",
            "progress")  # fmt: skip


def task_id_for(submission_id: str) -> str:
    return str(uuid.uuid5(_SUBMISSIONS, submission_id))


def now_text() -> str:
    """Globus's time form: `2026-12-01 15:51:16+00:00`."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S+00:00")


def parse_time(text: str) -> datetime:
    """A Globus or RFC 3339 time (naive ones are UTC); ValueError if it is neither."""
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def is_canceled(reason: str) -> str | None:
    """CANCELED or DEADLINE_EXCEEDED for a Finished reason of a stopped task, else None."""
    text = reason.lower()
    if "deadline" in text:
        return "DEADLINE_EXCEEDED"
    if "cancel" in text:
        return "CANCELED"
    return None


@dataclass
class Snapshot:
    """What one look at a transfer job shows: enough for every document."""

    job: Job
    request: dict[str, Any]
    progress: dict[str, Any]
    cancel: bool
    deleted: bool
    finished: list[Any]
    # CANCELED or DEADLINE_EXCEEDED: a queued job stopped back into data/ (its history)
    stopped: str | None = None

    @property
    def fatal(self) -> dict[str, str] | None:
        """Why the transfer failed, once it has: from the task, or from a stopped run."""
        from batchingest.store import State

        found = self.progress.get("fatal_error")
        if isinstance(found, dict):
            return {"code": str(found.get("code")), "description": str(found.get("description"))}
        last = self.finished[-1] if self.finished and isinstance(self.finished[-1], dict) else {}
        if self.job.state == State.DATA and (self.cancel or self.stopped):
            code = self.stopped or "CANCELED"
            words = "deadline passed" if code == "DEADLINE_EXCEEDED" else "canceled by request"
            return {"code": code, "description": words}
        if self.job.state == State.ERROR:
            reason = str(last.get("Reason", "the transfer task failed"))
            if last.get("Status") == "canceled":
                return {"code": is_canceled(reason) or "CANCELED", "description": reason}
            return {"code": "FAILED", "description": reason}
        return None


def _stopped_while_queued(dir_fd: int) -> str | None:
    """CANCELED or DEADLINE_EXCEEDED if that is the last word of the job's history."""
    from batchingest import events

    try:
        history = events.read_history(dir_fd, 64 << 10)
    except OSError:
        return None
    for event in reversed(history):
        code = event.get("code")
        if code in ("CANCELED", "DEADLINE_EXCEEDED"):
            return str(code)
        if code in ("QUEUED", "CREATED", "CLAIMED"):
            return None
    return None


def _json(dir_fd: int, name: str, limit: int) -> dict[str, Any]:
    try:
        raw = fs.read_file(dir_fd, name, limit)
    except (OSError, ValueError):
        return {}
    if raw is None:
        return {}
    with contextlib.suppress(ValueError):
        data = json.loads(raw)
        if isinstance(data, dict):
            return data
    return {}


def read_request(dir_fd: int) -> dict[str, Any]:
    return _json(dir_fd, REQUEST, MAX_REQUEST)


def read_progress(dir_fd: int) -> dict[str, Any]:
    return _json(dir_fd, PROGRESS, MAX_PROGRESS)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        return fs.lstat(dir_fd, name) is not None
    except OSError:
        return False


def snapshot(store: Store, name: str, request: dict[str, Any] | None = None) -> Snapshot | None:
    """The transfer job name as it is now; None if there is no such transfer job.

    request may be passed when it is already known (it never changes once written).
    """
    from batchingest import jobdir
    from batchingest.store import State

    def look(job: Job) -> Snapshot | None:
        try:
            fd = store.open_job(job)
        except OSError:
            return None
        try:
            req = request if request is not None else read_request(fd)
            if not req.get("kind"):
                return None
            finished: list[Any] = []
            if job.state in (State.ERROR, State.DATA):
                with contextlib.suppress(Exception):
                    finished = jobdir.load_job(fd).finished
            stopped = _stopped_while_queued(fd) if job.state == State.DATA else None
            return Snapshot(job, req, read_progress(fd), _exists(fd, CANCEL),
                            _exists(fd, DELETED), finished, stopped)  # fmt: skip
        finally:
            os.close(fd)

    try:
        found = store.read(name, look)
    except ValueError:  # not a job name at all
        return None
    return found[1] if found is not None else None


# -- creating -------------------------------------------------------------------------------


def create(store: Store, name: str, request: dict[str, Any], deadline: str | None) -> bool:
    """Create and queue the job of a transfer request; False if a job of that name exists.

    The job is built in data/ and queued once complete, so a processor never sees half
    of it; a failure removes it again.
    """
    from batchingest import jobdir, jobfile

    job, created = store.create(name)
    if not created:
        return False
    try:
        fd = store.open_job(job)
        try:
            fs.write_atomic(fd, REQUEST, json.dumps(request).encode(), mode=0o644)
            extra = {"Deadline": deadline} if deadline else {}
            jobdir.save_job(fd, jobfile.JobFile(todo=[TASK], extra=extra))
        finally:
            os.close(fd)
        store.queue(name)
    except BaseException:
        with contextlib.suppress(Exception):
            store.delete(name)
        raise
    return True


# -- cancel ---------------------------------------------------------------------------------


def request_cancel(store: Store, name: str) -> Job:
    """Ask a transfer job to stop, as `POST /jobs/{id}/cancel` does (batchingest.control):
    a queued one goes back to data/, a running one's task is stopped by its holder (the
    transfer task also looks for the request itself between files and pieces, and saves
    its progress when told to stop). A job no longer queued or running is left alone."""
    from batchingest import control

    try:
        return control.request_cancel(store, name)
    except control.NotCancellable as e:
        return e.job


def mark_deleted(store: Store, job: Job) -> None:
    fd = store.open_job(job)
    try:
        fs.write_atomic(fd, DELETED, now_text().encode() + b"\n")
    finally:
        os.close(fd)


# -- listing --------------------------------------------------------------------------------


class Requests:
    """Request documents by job name, read once: a request never changes once written.

    Listing 10,000 tasks reads each request file the first time only; after that a page
    costs the state folders' listings (cached by the store) and the progress of the
    tasks shown. Jobs that are not transfers are remembered as None.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._known: dict[str, dict[str, Any] | None] = {}
        self._lock = threading.Lock()

    def get(self, job: Job) -> dict[str, Any] | None:
        with self._lock:
            if job.name in self._known:
                return self._known[job.name]
        if not _looks_like_uuid(job.name):
            return None
        found = self.store.read(job.name, self._read)
        if found is None or found[1] is _CREATING:
            return None  # gone, or still being made: look again next time
        req = found[1] or None
        with self._lock:
            self._known[job.name] = req
        return req

    def _read(self, job: Job) -> dict[str, Any] | None:
        """The request in job's folder; {} for none, _CREATING while it is being made.

        Through store.read, so a job moving on (queue/ to processing/) meanwhile is
        looked up again rather than left out of a listing.
        """
        try:
            fd = self.store.open_job(job)
        except OSError:
            return _CREATING
        try:
            req = read_request(fd)
            if not req and fs.lstat(fd, "JOB") is None:
                return _CREATING
            return req
        finally:
            os.close(fd)

    def listing(self) -> list[tuple[str, State, dict[str, Any]]]:
        """(name, state, request) of every transfer job, one entry per name.

        From the store's cached name listings, with no stat or Path per known job:
        task_list lists 10,000 of them on every call.
        """
        from batchingest.store import Job, State

        out = []
        for state in State:
            base = self.store.state_dir(state)
            for name in self.store.job_names(state):
                with self._lock:
                    known = name in self._known
                    req = self._known.get(name)
                if not known:
                    req = self.get(Job(name, state, base / name))
                if req is not None:
                    out.append((name, state, req))
        return out


_CREATING: dict[str, Any] = {"creating": True}


def _looks_like_uuid(name: str) -> bool:
    return len(name) == 36 and name.count("-") == 4
