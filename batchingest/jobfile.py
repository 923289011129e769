"""The JOB file: a job's task list, `{"Todo": [...], "Finished": [...]}`.

The field names are those of the original service, so existing jobs and tools keep
working. Unknown top-level fields are kept on every rewrite. A missing JOB, or one with
nothing to do and nothing done, means the default task list `["start"]`.

This module is the format; reading and writing JOB in a job folder (through the
folder's descriptor, never following links) is `batchingest.jobdir`.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from batchingest import fs
from batchingest.store import valid_name

JOB_FILE = "JOB"
# Largest JOB read: a task list of thousands of entries fits many times over, while a
# runaway file (or one copied over /dev/zero) cannot stall the API or a worker parsing it.
JOB_LIMIT = 1 << 20
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
        """JOB as json.dumps(indent=2) writes it, byte for byte.

        json's indented output is its slow pure-Python encoder; msgspec's compact output
        re-indented is the same text wherever both escape and print alike, and json is
        kept for the rest (non-ASCII and DEL, numbers with an exponent, NaN, ints
        beyond 64 bits, which msgspec writes otherwise).
        """
        data = self.to_json()
        try:
            compact = _ENCODER.encode(data)
        except (TypeError, OverflowError, msgspec.EncodeError):
            compact = b"\x7f"  # not encodable by msgspec: json's turn
        if compact.isascii() and not _JSON_WRITES_OTHERWISE.search(compact):
            return msgspec.json.format(compact, indent=2) + b"\n"
        return (json.dumps(data, indent=2) + "\n").encode()


_ENCODER = msgspec.json.Encoder()
# what msgspec writes unlike json (ensure_ascii, float repr): an exponent, NaN or an
# infinity (null), DEL; a string merely containing these only costs the slow path
_JSON_WRITES_OTHERWISE = re.compile(rb"[0-9][eE]|null|\x7f")


def now_rfc3339() -> str:
    """The current UTC time as RFC 3339 with milliseconds, e.g. 2026-11-23T14:10:48.123Z."""
    global _second
    ms = time.time_ns() // 1_000_000
    second, milli = divmod(ms, 1000)
    head = _second
    if head[0] != second:
        # strftime is most of the cost, and every job writes several stamps a second
        text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        head = _second = (second, text)  # one tuple: threads see both or neither
    return f"{head[1]}.{milli:03d}Z"


_second: tuple[int, str] = (-1, "")


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
    if len(raw) > JOB_LIMIT:
        raise JobFileError(
            f"JOB is larger than {JOB_LIMIT} bytes (1 MiB), more than any task list needs"
        )
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
    """jobdir.load_job for a job folder given by path (kept for callers holding a path).

    A job folder that is gone reads as having no JOB, as before.
    """
    from batchingest import jobdir  # jobdir builds on this module

    try:
        fd = jobdir.open_folder(job_dir)
    except FileNotFoundError:
        return JobFile()
    try:
        return jobdir.load_job(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: Path, content: bytes, *, durable: bool = True, mode: int | None = None
) -> None:
    """fs.write_atomic for a path whose folder is the service's own (outbox, token file).

    Kept for callers outside job folders; inside a job use jobdir / fs with the job's
    descriptor. The file is private (0600) unless a mode is given.
    """
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fs.write_atomic(dir_fd, path.name, content, durable=durable, mode=mode or 0o600)
    finally:
        os.close(dir_fd)


def save(job_dir: Path, job: JobFile) -> None:
    """jobdir.save_job for a job folder given by path."""
    from batchingest import jobdir

    fd = jobdir.open_folder(job_dir)
    try:
        jobdir.save_job(fd, job)
    finally:
        os.close(fd)
