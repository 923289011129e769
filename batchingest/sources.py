"""Where the operator commands get their answers: a jobs root on this machine.

`batchingest jobs`, `show`, `logs`, `queue`, `requeue` and `status` each render once,
from one of two sources with the same methods: `LocalSource` here, working on a jobs
root through `Store` and the access layer `batchingest.fs`, and `HttpSource`
(batchingest.client), asking a running service. Both answer in the JSON shapes of the
HTTP API (`{"Name", "Status", ...}`), so the output cannot tell them apart.

Everything inside a job folder is user input: LOG and JOB are read through descriptors
from `Store.open_job`, so a LOG planted as a link to another file, or as a FIFO, is
refused rather than printed or waited on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from batchingest import control, events, filetimes, fs, jobfile
from batchingest.api import models
from batchingest.store import FEED, Job, JobBusy, JobNotFound, Store, parse_statuses

FAILURE = 1  # the command could not do what was asked (exit status)
USAGE = 2  # a bad flag, name or setting: nothing was contacted or changed
LOG_FILE = "LOG"
LOG_CHUNK = 1 << 20  # bytes of LOG read (or requested) at a time


class CommandError(Exception):
    """What went wrong, in one line for stderr (its str), and the exit status it means."""

    def __init__(self, message: str, status: int = FAILURE) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class LogPiece:
    """Bytes of a LOG from an offset, and the LOG's whole size when they were read."""

    data: bytes
    size: int


class Source(Protocol):
    """What the commands need from a jobs root, local or behind the HTTP API."""

    def describe(self) -> str: ...

    def list_jobs(self, states: list[str]) -> list[dict[str, Any]]: ...

    def job_info(self, name: str) -> dict[str, Any]: ...

    def read_log(self, name: str, offset: int) -> LogPiece | None: ...

    def queue(self, name: str) -> tuple[str, bool]: ...

    def cancel(self, name: str) -> dict[str, Any]: ...

    def events(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], str | None]: ...

    def stuck(self) -> list[str] | None: ...

    def close(self) -> None: ...


def no_job(name: str) -> CommandError:
    return CommandError(f"no job named {name!r}")


class LocalSource:
    """A jobs root on this machine."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def describe(self) -> str:
        return f"jobs root {self.store.root}"

    def list_jobs(self, states: list[str]) -> list[dict[str, Any]]:
        return [{"Name": j.name, "Status": j.status} for j in self.store.list(states)]

    def job_info(self, name: str) -> dict[str, Any]:
        found = self.store.read(name, self._info)
        if found is None or found[1] is None:
            raise no_job(name)
        return found[1]

    def _info(self, job: Job) -> dict[str, Any] | None:
        info: dict[str, Any] = {"Name": job.name, "Status": job.status}
        info.update(filetimes.job_times(str(job.path)))  # as GET /jobs/{id} shows them
        try:
            dir_fd = self.store.open_job(job)
        except (FileNotFoundError, NotADirectoryError):
            return None  # moved on: Store.read looks again
        info["Events"] = events.count(dir_fd)  # as GET /jobs/{id} shows it
        try:
            raw = fs.read_file(dir_fd, jobfile.JOB_FILE, jobfile.JOB_LIMIT)
            jf = jobfile.JobFile() if raw is None else jobfile.parse(raw)
        except fs.UnsafePath:
            info.update(Todo=None, Finished=None, JobError="JOB is a symbolic link (not followed)")
        except fs.NotRegular:
            info.update(Todo=None, Finished=None, JobError="JOB is not a regular file")
        except fs.TooLarge:
            info.update(Todo=None, Finished=None, JobError=f"JOB is over {jobfile.JOB_LIMIT} bytes")
        except (jobfile.JobFileError, OSError) as e:
            info.update(Todo=None, Finished=None, JobError=str(e))
        else:
            info.update(Todo=jf.todo, Finished=jf.finished)
        finally:
            os.close(dir_fd)
        return info

    def read_log(self, name: str, offset: int) -> LogPiece | None:
        """Up to LOG_CHUNK bytes of the job's LOG from offset; None if it has no LOG.

        The job is looked up again on every call, so a follower keeps up with it as it
        moves from queue/ to processing/ to success/.
        """
        found = self.store.read(name, lambda job: self._log_piece(job, offset))
        if found is None:
            raise no_job(name)
        return found[1]

    def _log_piece(self, job: Job, offset: int) -> LogPiece | None:
        try:
            dir_fd = self.store.open_job(job)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            fd = fs.open_regular(dir_fd, LOG_FILE)
        except FileNotFoundError:
            return None
        except fs.UnsafePath:
            raise CommandError(f"the LOG of {job.name!r} is a link: not followed") from None
        except fs.NotRegular as e:
            raise CommandError(f"the LOG of {job.name!r} is {e.strerror}") from None
        finally:
            os.close(dir_fd)
        try:
            size = os.fstat(fd).st_size
            data = os.pread(fd, LOG_CHUNK, offset) if offset < size else b""
            return LogPiece(data, size)
        finally:
            os.close(fd)

    def queue(self, name: str) -> tuple[str, bool]:
        """Move a job to queue/; its status afterwards, and whether it was moved."""
        try:
            job, moved = self.store.queue(name)
        except JobNotFound:
            raise no_job(name) from None
        except JobBusy as e:
            raise CommandError(str(e)) from None
        except OSError as e:
            raise CommandError(f"cannot queue {name!r}: {e.strerror or e}") from None
        return job.status, moved

    def cancel(self, name: str) -> dict[str, Any]:
        """Leave a cancel request in the job, as the API does: whichever processor holds
        the job (in a service on this root, or on another host) stops it; a queued job is
        taken back to data/ at once. The events are recorded here, as the API records its.
        """
        recorder = events.Recorder(self.store)
        recorder.attach()
        try:
            job = control.request_cancel(
                self.store, name, "canceled from the command line", by="command line"
            )
        except JobNotFound:
            raise no_job(name) from None
        except (control.NotCancellable, JobBusy) as e:
            raise CommandError(str(e)) from None
        finally:
            recorder.close()
        return {"Name": job.name, "Status": job.status}

    def events(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], str | None]:
        """A page of the root's feed, each event as GET /events gives it."""
        feed = events.Feed(self.store.root_fd, FEED, create=False)
        try:
            start = None if after is None else events.Cursor.parse(after)
            page, more = feed.read(start, limit)
        except (events.BadCursor, ValueError) as e:
            raise CommandError(f"invalid cursor {after!r}: {e}", USAGE) from None
        finally:
            feed.close()
        found = [msgspec.to_builtins(models.feed_event(event, at.text)) for event, at in page]
        return found, page[-1][1].text if more else None

    def stuck(self) -> list[str] | None:
        return self.store.stuck()

    def close(self) -> None:
        pass


def check_states(value: str | None) -> list[str]:
    """The states a `--status` list names (statuses or folder names, as the API takes)."""
    try:
        return list(parse_statuses(value))
    except ValueError as e:
        raise CommandError(str(e), USAGE) from None
