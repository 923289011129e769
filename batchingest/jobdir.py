"""The service's own files in a job folder: JOB, LOG and their names, in one place.

A job folder is user input (it arrives by `cp -r`, which keeps symbolic links, and by
upload), so every file here is reached through the folder's descriptor with
`batchingest.fs`: a link is never followed, a FIFO or device is never opened for
reading or writing, and JOB is read with a size cap. What is wrong is said in words a
person can act on, in the job's LOG or JOB, never by hanging a worker or by writing
outside the job.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from batchingest import fs
from batchingest.jobfile import JOB_FILE, JOB_LIMIT, JobFile, JobFileError, now_rfc3339, parse
from batchingest.store import LOCK_FILE  # the processor's lock: hidden, never listed or served

if TYPE_CHECKING:
    from batchingest.runner import TaskResult

__all__ = [
    "EVENTS_FILE",
    "JOB_FILE",
    "JOB_LIMIT",
    "LOCK_FILE",
    "LOG_FILE",
    "WEBHOOK_FILE",
    "LogError",
    "LogTail",
    "append_log",
    "failure_record",
    "finished_record",
    "load_job",
    "log_line",
    "open_folder",
    "open_log",
    "read_log_tail",
    "record_failure",
    "save_job",
]

LOG_FILE = "LOG"
WEBHOOK_FILE = "WEBHOOK"
# The job's history (events.py): hidden, so never listed, served or uploaded over.
EVENTS_FILE = ".events"


@dataclass(frozen=True)
class LogTail:
    """The end of a job's LOG: at most `cap` bytes of it, decoded leniently."""

    text: str
    size: int  # the whole LOG's length in bytes
    cut: bool  # whether the LOG was longer than what `text` holds


def read_log_tail(dir_fd: int, cap: int) -> LogTail:
    """The last `cap` bytes of the job's LOG (empty if there is none).

    The one LOG tail reader: it reads through the job folder's descriptor, so a LOG that
    is a link or a FIFO raises fs.UnsafePath / fs.NotRegular instead of being read.
    """
    found = fs.read_tail(dir_fd, LOG_FILE, cap)
    if found is None:
        return LogTail("", 0, False)
    data, size = found
    return LogTail(data.decode("utf-8", errors="replace"), size, size > len(data))


class LogError(Exception):
    """The job's LOG is a link or a special file, so the service will not write it."""


def open_folder(job_dir: Path | str) -> int:
    """A descriptor for a job folder given by path: the folder itself must not be a link.

    For callers that still hold a path (the parents, the jobs root and its state
    folders, are the service's own); `Store.open_job` is the way for new code.
    """
    fd = os.open(job_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    return fd


def _folder(where: int | Path | str) -> tuple[int, bool]:
    """(descriptor, whether we opened it) for a descriptor or a path."""
    if isinstance(where, int):
        return where, False
    return open_folder(where), True


# -- JOB ------------------------------------------------------------------------------


def load_job(dir_fd: int) -> JobFile:
    """The job's JOB file; the default task list if there is none.

    JobFileError for a JOB that is not JSON of the right shape, is larger than
    JOB_LIMIT, is a link or is not a regular file: the processor puts such a job in
    error/ with that message, the API shows it.
    """
    try:
        raw = fs.read_file(dir_fd, JOB_FILE, JOB_LIMIT)
    except fs.TooLarge:
        raise JobFileError(
            f"JOB is larger than {JOB_LIMIT} bytes (1 MiB), more than any task list needs"
        ) from None
    except fs.UnsafePath:
        raise JobFileError(
            "JOB is a symbolic link; links in a job folder are never followed"
        ) from None
    except fs.NotRegular as e:
        what = fs.kind(st.st_mode) if (st := fs.lstat(dir_fd, JOB_FILE)) else "gone"
        raise JobFileError(f"JOB is a {what}, not a regular file") from e
    if raw is None:
        return JobFile()
    return parse(raw)


def save_job(dir_fd: int, job: JobFile) -> None:
    """Replace JOB atomically and durably (fsync before the rename).

    JOB is read by curators and other accounts' tools, like every file of a job: 0644.
    """
    fs.write_atomic(dir_fd, JOB_FILE, job.dumps(), mode=0o644)


def finished_record(result: TaskResult) -> dict[str, object]:
    """The JOB `Finished` entry for one task run."""
    entry: dict[str, object] = {
        "Name": result.task,
        "Start": result.start,
        "Finish": result.finish,
        "Status": "ok" if result.ok else "error",
    }
    if not result.ok:
        entry["ExitCode"] = result.exit_code
        entry["Reason"] = result.reason
    return entry


def failure_record(task: str, reason: str) -> dict[str, object]:
    """A `Finished` entry for a task that could not even be started, e.g. LOG unusable."""
    now = now_rfc3339()
    return {
        "Name": task,
        "Start": now,
        "Finish": now,
        "Status": "error",
        "ExitCode": None,
        "Reason": reason,
    }


def record_failure(dir_fd: int, reason: str) -> bool:
    """Record in JOB why the job's next task could not run; False if JOB is unusable too.

    For a job whose LOG cannot be written, JOB is the one place the reason can go.
    """
    try:
        job = load_job(dir_fd)
        job.finished.append(failure_record(job.todo[0] if job.todo else "(none)", reason))
        save_job(dir_fd, job)
    except (JobFileError, OSError):
        return False
    return True


# -- LOG ------------------------------------------------------------------------------


def open_log(where: int | Path | str) -> int:
    """The job's LOG opened for appending (created if missing), blocking, close-on-exec.

    LogError if LOG is a symbolic link, a FIFO, a folder or a device: appending would
    write outside the job (as the service's user) or hang. Other OSErrors (the job
    folder is gone) pass through.
    """
    dir_fd, own = _folder(where)
    try:
        try:
            return fs.open_append(dir_fd, LOG_FILE)
        except OSError:
            st = fs.lstat(dir_fd, LOG_FILE)
            if st is None or stat.S_ISREG(st.st_mode):
                raise
        # a FIFO without a reader fails with ENXIO before fs can look at it: say what it is
        raise LogError(
            f"LOG is a {fs.kind(st.st_mode)}, not a regular file, so it cannot be written "
            "(links and special files in a job folder are never followed or opened)"
        )
    finally:
        if own:
            os.close(dir_fd)


def log_line(log_fd: int, text: str) -> None:
    """Append one timestamped line from the service to a job's LOG."""
    fs.write_all(log_fd, f"{now_rfc3339()} batchingest: {text}\n".encode(errors="replace"))


def append_log(where: int | Path | str, text: str) -> None:
    """log_line for a job whose LOG is not open; LogError or OSError if it cannot be."""
    fd = open_log(where)
    try:
        log_line(fd, text)
    finally:
        os.close(fd)
