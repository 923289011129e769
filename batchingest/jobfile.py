"""The JOB file: a job's task list, `{"Todo": [...], "Finished": [...]}`.

The field names are those of the original service, so existing jobs and tools keep
working. Unknown top-level fields are kept on every rewrite. A missing JOB, or one with
nothing to do and nothing done, means the default task list `["start"]`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batchingest.store import valid_name

JOB_FILE = "JOB"
DEFAULT_TODO = ("start",)


class JobFileError(ValueError):
    """The JOB file is not valid JSON or has the wrong shape."""


@dataclass
class JobFile:
    todo: list[str] = field(default_factory=lambda: list(DEFAULT_TODO))
    finished: list[Any] = field(default_factory=list)
    # every other top-level field, in its original order
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"Todo": self.todo, "Finished": self.finished}
        data.update(self.extra)
        return data

    def dumps(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2) + "\n").encode()


def now_rfc3339() -> str:
    """The current UTC time as RFC 3339 with milliseconds, e.g. 2026-11-23T14:10:48.123Z."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def validate(data: object) -> JobFile:
    """Check the shape the processor relies on; raise JobFileError saying what is wrong."""
    if not isinstance(data, dict):
        raise JobFileError(f"JOB must be a JSON object, not {type(data).__name__}")
    todo = data.get("Todo")
    finished = data.get("Finished")
    if todo is None:
        todo = []
    if finished is None:
        finished = []
    if not isinstance(todo, list):
        raise JobFileError("JOB field Todo must be a list of task names")
    for i, task in enumerate(todo):
        if not isinstance(task, str) or not valid_name(task):
            raise JobFileError(
                f"JOB Todo[{i}] = {json.dumps(task)[:200]} is not a valid task name "
                "(1-255 characters of A-Z a-z 0-9 . _ -, not starting with '.')"
            )
    if not isinstance(finished, list):
        raise JobFileError("JOB field Finished must be a list")
    extra = {k: v for k, v in data.items() if k not in ("Todo", "Finished")}
    if not todo and not finished:
        todo = list(DEFAULT_TODO)
    return JobFile(todo=list(todo), finished=list(finished), extra=extra)


def parse(raw: bytes) -> JobFile:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JobFileError(f"JOB is not valid JSON: {e}") from None
    except (ValueError, RecursionError) as e:
        # json raises these for valid-looking input it will not decode: an integer of
        # more than 4300 digits, or arrays nested thousands deep
        raise JobFileError(f"JOB cannot be read as JSON: {e}") from None
    return validate(data)


def load(job_dir: Path) -> JobFile:
    """Read a job's JOB file; the default task list if there is none.

    Bare os calls, as this runs for every job processed and every `GET /jobs/{id}`;
    O_NONBLOCK so that a FIFO named JOB cannot hang a worker or the event loop.
    """
    try:
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
        fd = os.open(f"{job_dir}/{JOB_FILE}", flags)
    except FileNotFoundError:
        return JobFile()
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except IsADirectoryError:
        raise JobFileError("JOB is a folder, not a file") from None
    except BlockingIOError:
        raise JobFileError("JOB is not a regular file") from None
    finally:
        os.close(fd)
    return parse(b"".join(chunks))


def write_atomic(
    path: Path, content: bytes, *, durable: bool = True, mode: int | None = None
) -> None:
    """Replace path with content so that a crash leaves the old or the new file, never a mix.

    The temporary file is hidden and lives beside the target, so the rename stays within
    one file system and no listing ever shows it. The data is fsync-ed before the rename,
    so a rename that survives a power loss always points at complete content; the folder
    itself is not fsync-ed: losing the rename loses the last update, never the file.
    The file is private (0600) unless a mode is given.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save(job_dir: Path, job: JobFile) -> None:
    # JOB is read by curators and other accounts' tools, like every file of a job
    write_atomic(job_dir / JOB_FILE, job.dumps(), mode=0o644)
