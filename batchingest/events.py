"""Job history: each job's own events, and one feed of every job's events.

Every event is one line of JSON: `code`, `time` (RFC 3339 UTC, ms), `is_error`,
`description` (one sentence), `details` (an object) and the job's `state` (its status
word) after it.

- **The history** of a job is the hidden file `.events` in its folder (jobdir.EVENTS_FILE),
  so it moves with the job and survives restarts. It is appended with O_APPEND through
  the folder's descriptor (batchingest.fs), never by path. Like everything in a job
  folder it is user input: a link, FIFO or folder there is never written or read (the
  history is then not kept, the feed still is, and the service log says why once), it
  is read bounded (its last HISTORY_READ_LIMIT bytes), and lines that are not events,
  a torn last line after a crash among them, are skipped. Before appending to a file
  whose last line is torn a newline is written, so the next event is never glued to it.
- **The feed** is `ROOT/.events/` (Store.service_path): one segment file of JSON lines
  per UTC hour, `<hours since 1970>.jsonl`, each line an event plus its `job`. Every
  process on the root appends to the current hour's segment with O_APPEND; lines are
  kept under MAX_LINE bytes, and one write of a line that short does not interleave
  with another on a local file system. (On NFS, O_APPEND is emulated by the client and
  two machines appending at once can overwrite each other's lines: run one service per
  root there, or accept that the feed may lose an event; the per-job histories are
  written by one holder at a time.) A cursor is the segment and the byte offset after
  an event's line, so `after=` is a seek, never a scan. Segments older than
  `--events-keep` days are removed.
- **Durability.** A job's history is written before the move that caused it returns
  (the store's listeners run before that): it is the durable record. fsync is grouped:
  at each state change the history file is handed to a flusher thread, which every
  FLUSH_TICK at most flushes what it was handed (and the feed) in one batch while the
  next moves go on, so a move never waits for a disk flush (the rename of the move
  itself is not fsync-ed either). Task and file events ride on the next state change's
  flush (or the kernel's writeback).
- **The feed trails by a tick.** A feed line is not written where it is recorded: it is
  copied into this process's spool (_Spool, a file of ROOT/.events mapped into memory),
  and the flusher writes the spool's lines to the feed in one write a round. So the
  feed may show an event up to a tick after the job's history. The spool is in the page
  cache, so a kill -9 loses nothing: the next recorder started with this host id
  (--host-id) writes the lines the feed lacks (replay_spools), each once, after any
  reader's cursor. A power cut loses the last tick of the feed, as it did before, and
  the histories keep it. The spool's blocks are allocated when it is made: a store into
  a page without one on a full disk would be a SIGBUS. An extra API process has no
  spool and writes its lines at once (its moves are recorded by the main process,
  whose API events are written at once too then: Recorder.notes_at_once), so a job's
  events are in the feed in the order its requests were answered.
- **Cost.** A processor keeps the history of a job it holds open from the claim to the
  final move (Recorder._held), so task events are one write each; a claim opens it
  through the folder the claim locked (Store.moving_folder), or takes over the one a
  worker made while it waited for a task slot (Recorder.ready): on a file system where
  making a file is dear (ext4 without a journal skips recently freed inodes one by one)
  that is most of a claim's cost, and a slot is not held for it. A job seen in queue/ by
  hand gets its QUEUED with its claim (one write with CLAIMED) unless it waits
  QUEUED_DELAY; one written before keeps its history open (Recorder._waiting). A history
  handed to the flusher is never copied: the recorder gives it back (_Flusher.retire)
  instead of closing it, and the flusher closes it after its flush; one that a batch's
  syncfs will flush is closed at once, since every task's fork copies and closes each
  descriptor the process holds.

Who does what: the store listener (`Recorder.on_move`) writes the events of moves
(QUEUED, CLAIMED, SUCCEEDED, FAILED, RECOVERED, RENAMED); the processor, the API and
webhook delivery call the small functions at the end of this module (each a no-op where
no recorder is attached, and never raising). A job moved into queue/ by hand makes no
store move: when a processor lists queue/ (woken by the watcher, or by its poll), a new
name whose history does not end in the queue state gets QUEUED (`by: hand`), timed
then, written with its claim or QUEUED_DELAY later; a job taken before any listing saw
it gets it just before CLAIMED too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import itertools
import json
import logging
import mmap
import os
import re
import resource
import socket
import stat
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar, cast

import msgspec

from batchingest import fs, lease
from batchingest.jobdir import EVENTS_FILE
from batchingest.store import FEED, FINAL, InvalidName, Job, State, Store, StoreError

if TYPE_CHECKING:
    from batchingest.runner import TaskResult
    from batchingest.store import Hold

log = logging.getLogger("batchingest.events")

# A line stays well under PIPE_BUF-like sizes: one write(2) of it is never interleaved.
MAX_LINE = 3800
# The most of a job's history that is read (its newest part): a planted 10 GiB `.events`
# costs one bounded read, never the memory of the service.
HISTORY_READ_LIMIT = 16 << 20
_TAIL = 8192
SEGMENT_SECONDS = 3600
# Readers move on from an hour's segment only this long after the hour ended: a writer
# that read the clock just before the hour turned has written its line by then.
SEGMENT_GRACE = 5.0
_CHUNK = 1 << 16
FLUSH_IDLE = 1.0
# At most one flush per tick: a history is durable within about this long of its move.
FLUSH_TICK = 0.05
# A batch of this many histories on one file system is flushed with one syncfs (the
# state folders may be mount points: one per file system); fewer are fsync-ed one by one.
SYNCFS_BATCH = 4
MAX_PENDING = 512
# A job found in queue/ by hand gets its QUEUED (timed when it was first seen) with its
# claim when that comes within this long, one write with CLAIMED; one still waiting then
# gets it with the flusher's next round (which comes at least every FLUSH_IDLE).
QUEUED_DELAY = 2.0
SEEN_A_ROUND = 256
# Histories opened when a job was seen in queue/, kept for its claim: at most this many,
# and an eighth of the descriptors this process may open.
MAX_WAITING = 64
HOST = socket.gethostname()
# The feed's lines not yet written wait in a spool this large (allocated: see _Spool).
SPOOL_SIZE = 16 << 20
_SEGMENT_NAME = re.compile(r"([0-9]{1,12})\.jsonl")


class Code(StrEnum):
    CREATED = "CREATED"
    FILE_UPLOADED = "FILE_UPLOADED"
    FILE_DELETED = "FILE_DELETED"
    QUEUED = "QUEUED"
    CLAIMED = "CLAIMED"
    TASK_STARTED = "TASK_STARTED"
    TASK_SUCCEEDED = "TASK_SUCCEEDED"
    TASK_FAILED = "TASK_FAILED"
    TASK_TIMED_OUT = "TASK_TIMED_OUT"
    CANCEL_REQUESTED = "CANCEL_REQUESTED"
    CANCELED = "CANCELED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    RECOVERED = "RECOVERED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    WEBHOOK_DELIVERED = "WEBHOOK_DELIVERED"
    WEBHOOK_FAILED = "WEBHOOK_FAILED"
    RENAMED = "RENAMED"


ERROR_CODES = frozenset(
    {Code.TASK_FAILED, Code.TASK_TIMED_OUT, Code.DEADLINE_EXCEEDED, Code.FAILED,
     Code.WEBHOOK_FAILED}
)  # fmt: skip
_FIELDS = {"code": str, "time": str, "is_error": bool, "description": str, "details": dict}


# -- one event ------------------------------------------------------------------------


_SECOND: tuple[int, str] = (-1, "")  # the last second formatted, and its text


def _now() -> str:
    """now_rfc3339 (RFC 3339 UTC with milliseconds); the seconds formatted once a second."""
    global _SECOND
    t = time.time()
    second, text = _SECOND
    if int(t) != second:
        second, text = int(t), time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
        _SECOND = (second, text)
    return f"{text}.{int(t * 1000) % 1000:03d}Z"


def make_event(
    code: Code, state: str, description: str, details: dict[str, Any] | None = None,
    at: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """An event as stored and served; `state` is the job's status word after it; `at`
    its time if not now."""
    return {
        "code": str(code),
        "time": at or _now(),
        "is_error": code in ERROR_CODES,
        "description": description,
        "details": details or {},
        "state": state,
    }


# compact UTF-8 JSON, a few times cheaper than json's; json (escaping all but ASCII)
# for what msgspec will not write: ints beyond 64 bits, lone surrogates
_ENCODER = msgspec.json.Encoder()
_ASCII_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _dumps(data: dict[str, Any]) -> bytes:
    try:
        return _ENCODER.encode(data) + b"\n"
    except (TypeError, OverflowError, UnicodeError, msgspec.EncodeError):
        return _ASCII_ENCODER.encode(data).encode() + b"\n"


def encode(event: dict[str, Any]) -> bytes:
    """One line of JSON under MAX_LINE bytes: long texts are cut, never the line."""
    line = _dumps(event)
    if len(line) <= MAX_LINE:
        return line
    short = dict(event)
    short["description"] = str(event.get("description", ""))[:300]
    short["details"] = {
        k: v[:200] if isinstance(v, str) else v
        for k, v in list(dict(event.get("details") or {}).items())[:20]
    }
    line = _dumps(short)
    if len(line) <= MAX_LINE:
        return line
    short["details"] = {"truncated": True}
    return _dumps(short)


def decode(line: bytes, *, job: bool = False) -> dict[str, Any] | None:
    """The event on one line, or None for anything else (garbage, a torn line)."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    for key, kind in _FIELDS.items():
        if not isinstance(event.get(key), kind):
            return None
    if not isinstance(event.get("state"), str) or (job and not isinstance(event.get("job"), str)):
        return None
    return event


def parse_lines(data: bytes) -> list[dict[str, Any]]:
    """The events of complete lines; a last line without its newline is torn: skipped."""
    lines = data.split(b"\n")[:-1]
    return [e for e in map(decode, lines) if e is not None]


def status(state: str) -> str:
    return State(state).status


# -- a job's history ------------------------------------------------------------------


def _open_append(dir_fd: int, name: str) -> tuple[int, os.stat_result]:
    """fs.open_append, but readable too: the last byte says whether a line was torn."""
    # (O_NONBLOCK, which fs adds, changes nothing for a regular file)
    return fs.open_regular_stat(dir_fd, name, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)


def _end_torn_line(fd: int, size: int) -> int:
    """The file's size after closing a torn last line (a crash mid-write) with a newline;
    fd is closed on error."""
    try:
        if size and os.pread(fd, 1, size - 1) != b"\n":
            size += os.write(fd, b"\n")
    except BaseException:
        os.close(fd)
        raise
    return size


def open_history(dir_fd: int) -> int:
    """The job's `.events` opened for appending (created if missing).

    A torn last line (a crash mid-write) is closed with a newline first. Raises
    fs.UnsafePath or fs.NotRegular (a link, FIFO, folder) and other OSErrors.
    """
    return open_history_stat(dir_fd)[0]


def open_history_stat(dir_fd: int) -> tuple[int, int, int]:
    """open_history, the file's size then (0: new or empty, nothing to read back) and
    its device (for grouped flushes)."""
    # most are new; anything already there (a link or FIFO too) is looked at first
    fd = fs.create_new(dir_fd, EVENTS_FILE, os.O_RDWR | os.O_APPEND)
    if fd is not None:
        return fd, 0, _device_or_close(fd)
    try:
        fd, st = _open_append(dir_fd, EVENTS_FILE)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a FIFO nobody reads: open says so before any check
            raise fs.NotRegular(errno.EINVAL, "not a regular file (named pipe)", EVENTS_FILE) from e
        raise
    if st.st_nlink > 1:  # linked with another job's too (a job copied with `cp -al`)
        fd, st = _own_copy(dir_fd, fd, st)
    return fd, _end_torn_line(fd, st.st_size), st.st_dev


def _device_or_close(fd: int) -> int:
    try:
        return os.fstat(fd).st_dev
    except BaseException:
        os.close(fd)
        raise


def _own_copy(dir_fd: int, fd: int, st: os.stat_result) -> tuple[int, os.stat_result]:
    """A history that is another file's too, replaced in this folder by a copy of it
    (its last HISTORY_READ_LIMIT bytes, from a whole line on): this job's events then
    go to this job alone. fd is closed; the copy is opened as _open_append does."""
    try:
        start = max(0, st.st_size - HISTORY_READ_LIMIT)
        data = os.pread(fd, HISTORY_READ_LIMIT, start)
        if start:
            data = data[data.find(b"\n") + 1 :]  # the line cut at the start: dropped
        fs.write_atomic(dir_fd, EVENTS_FILE, data, durable=False, mode=0o644)
    finally:
        os.close(fd)
    return _open_append(dir_fd, EVENTS_FILE)


def append_history(dir_fd: int, line: bytes) -> int:
    """Append one line to the job's `.events` (see open_history); the open descriptor."""
    fd = open_history(dir_fd)
    try:
        os.write(fd, line)  # one write: lines of several writers never interleave
    except BaseException:
        os.close(fd)
        raise
    return fd


# Counts of histories by (device, inode, size, mtime, ctime): a history only grows, so
# while those are unchanged its count is too, and `GET /jobs/{id}` needs one lstat, not
# an open and a read, for a history counted before.
_COUNTS: dict[tuple[int, int, int, int, int], int] = {}
_COUNTS_KEPT = 10_000


def count(dir_fd: int, limit: int = HISTORY_READ_LIMIT) -> int:
    """How many events the job's history holds (whole lines, of its last `limit` bytes).

    For a job's info: counts line ends without parsing them; 0 if it has no history or
    the history is not a regular file (never followed or opened then).
    """
    try:
        st = os.stat(EVENTS_FILE, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return 0
    if not stat.S_ISREG(st.st_mode):
        return 0
    known = _COUNTS.get(fs.version(st))
    if known is not None and limit == HISTORY_READ_LIMIT:
        return known
    try:
        fd, st = fs.open_regular_stat(dir_fd, EVENTS_FILE)
    except OSError:
        return 0
    try:
        lines = _count_lines(fd, st.st_size, limit)
    finally:
        os.close(fd)
    if limit == HISTORY_READ_LIMIT:
        if len(_COUNTS) >= _COUNTS_KEPT:
            _COUNTS.clear()
        _COUNTS[fs.version(st)] = lines
    return lines


def _count_lines(fd: int, size: int, limit: int) -> int:
    start, lines = max(0, size - limit), 0
    while start < size:
        chunk = os.pread(fd, min(1 << 20, size - start), start)
        if not chunk:
            break
        lines += chunk.count(b"\n")
        start += len(chunk)
    return lines


def read_history(dir_fd: int, limit: int = HISTORY_READ_LIMIT) -> list[dict[str, Any]]:
    """The job's events, oldest first (of its last `limit` bytes); [] if it has none.

    fs.UnsafePath or fs.NotRegular if `.events` is a link or not a regular file.
    """
    found = fs.read_tail(dir_fd, EVENTS_FILE, limit)
    if found is None:
        return []
    data, total = found
    if total > len(data):
        data = data[data.find(b"\n") + 1 :]  # the first line was cut by the limit
    return parse_lines(data)


# noted about a job wherever it is (events.note): their state is its status when noted,
# not a move, so a webhook's result landing after `mv error/x queue/` must not read as
# "already queued" and hide that move's QUEUED
NOT_MOVES = frozenset({Code.WEBHOOK_DELIVERED, Code.WEBHOOK_FAILED, Code.CANCEL_REQUESTED})


def last_state(dir_fd: int) -> str | None:
    """The state after the job's last recorded move; None if unknown or unreadable."""
    try:
        found = fs.read_tail(dir_fd, EVENTS_FILE, _TAIL)
    except OSError:
        return None
    if found is None:
        return None
    return _last_state_in(found[0])


def _last_state_of(fd: int, size: int) -> str | None:
    """last_state of a history open for reading, `size` bytes long (just opened)."""
    try:
        return _last_state_in(os.pread(fd, _TAIL, max(0, size - _TAIL))) if size else None
    except OSError:
        return None


def _last_state_in(tail: bytes) -> str | None:
    lines = tail.split(b"\n")[:-1]  # the part after the last newline is torn
    for line in reversed(lines):  # the newest event that is one: no need to parse the rest
        event = decode(line)
        if event is not None and event["code"] not in NOT_MOVES:
            return event["state"]  # type: ignore[no-any-return]
    return None


# -- the feed -------------------------------------------------------------------------


class BadCursor(ValueError):
    pass


@dataclass(frozen=True, order=True)
class Cursor:
    """A place in the feed: the segment (hours since 1970) and a byte offset in it."""

    segment: int
    offset: int

    @property
    def text(self) -> str:
        return f"{self.segment:08x}{self.offset:012x}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        if not re.fullmatch(r"[0-9a-f]{20}", text):
            raise BadCursor(f"not a cursor of this feed: {text[:40]!r}")
        return cls(int(text[:8], 16), int(text[8:], 16))


def _segment_name(segment: int) -> str:
    return f"{segment:08d}.jsonl"


class Feed:
    """The root-wide feed: hourly segment files in one folder of the service's own."""

    def __init__(
        self, parent_fd: int, name: str, *, create: bool = True, keep_days: int = 7,
        clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self.clock = clock
        self.keep_days = keep_days
        self._lock = threading.Lock()
        self._segment = -1
        self._fd = -1
        self._device = -1
        self.dirty = False
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=parent_fd)
        try:
            self.dir_fd = fs.open_dir(parent_fd, name)
        except FileNotFoundError:
            self.dir_fd = -1  # a reader of a root where nothing was recorded yet

    def close(self) -> None:
        with self._lock:
            for fd in (self._fd, self.dir_fd):
                if fd >= 0:
                    os.close(fd)
            self._fd = self.dir_fd = -1

    def now_segment(self) -> int:
        return int(self.clock() // SEGMENT_SECONDS)

    # -- writing -------------------------------------------------------------------

    def append(self, lines: bytes) -> None:
        """Append whole lines in one write (on a local file system, never interleaved
        with another writer's)."""
        with self._lock:
            segment = self.now_segment()
            if segment != self._segment:
                self._switch(segment)
            self.dirty = True
            written = os.write(self._fd, lines)
            while written < len(lines):  # a full disk, say: never leave a line torn
                start = lines.rfind(b"\n", 0, written) + 1
                if start < written:
                    os.write(self._fd, b"\n")  # ends the torn piece; its line is rewritten
                lines = lines[start:]
                written = os.write(self._fd, lines)

    def _switch(self, segment: int) -> None:
        """Open the hour's segment (closing a torn line another writer left) and prune."""
        fd, st = _open_append(self.dir_fd, _segment_name(segment))
        _end_torn_line(fd, st.st_size)
        self._device = st.st_dev
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
        self._fd, self._segment = fd, segment
        self.prune()

    def sync(self, skip: set[int] | frozenset[int] = frozenset()) -> None:
        """fsync the current segment (outside the lock: writers go on meanwhile), unless
        its file system is one of `skip` (flushed whole just now)."""
        with self._lock:
            if not self.dirty or self._fd < 0:
                return
            self.dirty = False
            if self._device in skip:
                return
            fd = os.dup(self._fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def prune(self) -> int:
        """Remove segments older than keep_days; the count removed."""
        oldest = self.now_segment() - self.keep_days * 24
        removed = 0
        for segment in self.segments():
            if segment < oldest:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(_segment_name(segment), dir_fd=self.dir_fd)
                    removed += 1
        return removed

    # -- reading -------------------------------------------------------------------

    def tail_lines(self, size: int = 4 << 20) -> set[bytes]:
        """The lines in the last `size` bytes of the two newest segments."""
        found: set[bytes] = set()
        for segment in self.segments()[-2:]:
            tail = fs.read_tail(self.dir_fd, _segment_name(segment), size)
            if tail is not None:
                found.update(line + b"\n" for line in tail[0].split(b"\n")[:-1])
        return found

    def segments(self) -> list[int]:
        if self.dir_fd < 0:
            return []
        found = (_SEGMENT_NAME.fullmatch(n) for n in os.listdir(self.dir_fd))
        return sorted(int(m.group(1)) for m in found if m)

    def _closed(self, segment: int) -> bool:
        """No writer can still be adding to this hour's segment."""
        return self.clock() >= (segment + 1) * SEGMENT_SECONDS + SEGMENT_GRACE

    def live_end(self) -> Cursor:
        """Just after the newest complete event: where a live stream starts."""
        segments = self.segments()
        if not segments:
            return Cursor(self.now_segment(), 0)
        segment = segments[-1]
        fd = fs.open_regular(self.dir_fd, _segment_name(segment))
        try:
            size = os.fstat(fd).st_size
            start = max(0, size - _CHUNK)
            tail = os.pread(fd, size - start, start)
        finally:
            os.close(fd)
        return Cursor(segment, start + tail.rfind(b"\n") + 1)

    def read(
        self, after: Cursor | None, limit: int
    ) -> tuple[list[tuple[dict[str, Any], Cursor]], bool]:
        """Up to `limit` events after the cursor (from the oldest kept without one).

        Returns them with their cursors, and whether the page was filled (more may
        follow at once). BadCursor for a cursor that is not at an event's end.
        """
        segments = self.segments()
        start = Cursor(segments[0], 0) if after is None and segments else after
        if start is None:
            return [], False
        if start.segment not in segments:
            later = [s for s in segments if s > start.segment]
            if not later:
                return [], False  # nothing written after it yet (or all of it pruned)
            start = Cursor(later[0], 0)
        out: list[tuple[dict[str, Any], Cursor]] = []
        segment, offset = start.segment, start.offset
        check = after is not None and start == after
        while True:
            offset = self._read_segment(segment, offset, limit - len(out), out, check=check)
            check = False
            if len(out) >= limit:
                return out, True
            later = [s for s in segments if s > segment]
            if not later or not self._closed(segment):
                return out, False
            segment, offset = later[0], 0

    def _read_segment(
        self, segment: int, offset: int, want: int, out: list[tuple[dict[str, Any], Cursor]],
        *, check: bool,
    ) -> int:  # fmt: skip
        """Append up to `want` events of one segment from offset; the offset reached."""
        try:
            fd = fs.open_regular(self.dir_fd, _segment_name(segment))
        except FileNotFoundError:
            return offset  # pruned meanwhile
        try:
            size = os.fstat(fd).st_size
            if check and (offset > size or (offset and os.pread(fd, 1, offset - 1) != b"\n")):
                raise BadCursor("the cursor does not point at the end of an event")
            while len(out) < want and offset < size:
                chunk = os.pread(fd, min(_CHUNK, size - offset), offset)
                end = chunk.rfind(b"\n")
                if end < 0:
                    if len(chunk) == _CHUNK:  # no line is this long: skip the garbage
                        offset += len(chunk)
                        continue
                    break  # a line still being written
                for line in chunk[: end + 1].split(b"\n")[:-1]:
                    offset += len(line) + 1
                    event = decode(line, job=True)
                    if event is not None:
                        out.append((event, Cursor(segment, offset)))
                        if len(out) >= want:
                            break
            return offset
        finally:
            os.close(fd)


# -- the spool ------------------------------------------------------------------------

_SPOOL_NAME = re.compile(r"\.spool-([0-9]+)-([0-9]+)@(.+)")
_SPOOLS = itertools.count()  # several recorders of one process have a spool each
_SPOOL_HEADER = 16  # where the lines not yet in the feed start and end (two u64 values)


class _Spool:
    """The feed's lines not yet written to it, in a file of ROOT/.events mapped into
    this process's memory (`.spool-<pid>-<n>@<host id>`).

    Adding a line is a copy into memory, no system call; the lines stay in the page
    cache when the process is killed (kill -9), and the next recorder started on this
    host writes them to the feed (replay_spools). The header holds where the lines not
    yet written start and end, each an aligned 8-byte value that one store changes: a
    line counts once `end` is moved past it, and is written once `start` is.
    """

    def __init__(self, dir_fd: int, host: str) -> None:
        self.name = f".spool-{os.getpid()}-{next(_SPOOLS)}@{lease.host_label(host)}"
        fd = fs.open_regular(dir_fd, self.name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours while we live
            # every block given now: a store into a page without one on a full disk is
            # a SIGBUS that kills the process, where a failed write is only an error
            os.posix_fallocate(fd, 0, SPOOL_SIZE)
            self._map = mmap.mmap(fd, SPOOL_SIZE)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(self.name, dir_fd=dir_fd)
            os.close(fd)
            raise
        self.fd, self.dir_fd = fd, dir_fd
        self._start = self._end = _SPOOL_HEADER
        self._map[:_SPOOL_HEADER] = struct.pack("<QQ", self._start, self._end)

    def add(self, lines: bytes) -> bool:
        """Keep lines for the feed (under the caller's lock); False if there is no room."""
        end = self._end + len(lines)
        if end > SPOOL_SIZE:
            return False
        self._map[self._end : end] = lines
        struct.pack_into("<Q", self._map, 8, end)  # counted from now on
        self._end = end
        return True

    def waiting(self) -> bool:
        """Whether lines wait to be written (under the caller's lock)."""
        return self._end > self._start

    def pending(self) -> tuple[bytes, int]:
        """The lines not yet written, and where they end (under the caller's lock)."""
        return self._map[self._start : self._end], self._end

    def written(self, upto: int) -> None:
        """The lines before upto are in the feed (under the caller's lock)."""
        if upto == self._end:  # all of them: start again at the top; end first, so
            self._start = self._end = _SPOOL_HEADER  # a kill in between drops nothing
            struct.pack_into("<Q", self._map, 8, self._end)
        else:
            self._start = upto
        struct.pack_into("<Q", self._map, 0, self._start)

    def close(self) -> None:
        """Remove the spool (its lines were written) and close it."""
        with contextlib.suppress(OSError):
            os.unlink(self.name, dir_fd=self.dir_fd)
        self._map.close()
        os.close(self.fd)


def replay_spools(feed: Feed, host: str) -> int:
    """Write to the feed the lines that recorders killed on this host (its host id) left
    in their spools; the count written. Lines already in the feed's newest part (a kill
    after the feed was written and before the spool said so) are not written again. A
    spool that cannot be replayed is left (and logged): it never costs this process its
    own. Dead spools of other hosts untouched for the feed's keep_days are removed: their
    lines would be pruned from the feed by now, and the host may never start again.
    """
    oldest = feed.clock() - feed.keep_days * 86400
    replayed = 0
    for found in map(_SPOOL_NAME.fullmatch, os.listdir(feed.dir_fd)):
        if found is None:
            continue
        name = found.group(0)
        try:
            if found.group(3) == lease.host_label(host):
                replayed += _replay_spool(feed, name)
            else:
                _prune_spool(feed, name, oldest)
        except OSError as e:
            log.warning("%s: its events cannot be written to the feed: %s", name, e.strerror or e)
    return replayed


def _prune_spool(feed: Feed, name: str, oldest: float) -> None:
    """Remove another host's spool last changed before `oldest`, unless it is held."""
    if os.stat(name, dir_fd=feed.dir_fd, follow_symlinks=False).st_mtime >= oldest:
        return
    with _dead_spool(feed, name) as fd:
        if fd is not None:
            os.unlink(name, dir_fd=feed.dir_fd)


def _replay_spool(feed: Feed, name: str) -> int:
    """Replay one spool and remove it, unless its recorder is alive; the count written."""
    with _dead_spool(feed, name) as fd:
        if fd is None:
            return 0
        replayed = _replay(feed, fd)
        os.unlink(name, dir_fd=feed.dir_fd)
        return replayed


@contextlib.contextmanager
def _dead_spool(feed: Feed, name: str) -> Iterator[int | None]:
    """The spool `name` opened and locked if its recorder is gone (so no other recorder
    starting meanwhile takes it too); None if its recorder is alive (it holds the lock)
    or another removed the spool meanwhile."""
    try:
        # open for writing: an NFS client takes flock's lock only on such a descriptor
        fd = fs.open_regular(feed.dir_fd, name, os.O_RDWR)
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield fd if os.fstat(fd).st_nlink else None
    finally:
        os.close(fd)


def _replay(feed: Feed, fd: int) -> int:
    start, end = struct.unpack("<QQ", os.pread(fd, _SPOOL_HEADER, 0).ljust(_SPOOL_HEADER, b"\0"))
    end = min(end, SPOOL_SIZE, os.fstat(fd).st_size)
    if not _SPOOL_HEADER <= start < end:
        return 0
    data = os.pread(fd, end - start, start)
    lines = [line + b"\n" for line in data.split(b"\n")[:-1]]
    there = feed.tail_lines()
    missing = [line for line in lines if line not in there and decode(line, job=True)]
    if missing:
        feed.append(b"".join(missing))
    return len(missing)


# -- the flusher ----------------------------------------------------------------------


class _Flusher:
    """Writes the feed's lines and fsyncs the histories handed to it, in batches, in one
    thread: at most once a FLUSH_TICK, so many moves share one flush.

    A history handed for a flush stays the recorder's, which gives it back with retire()
    rather than closing it: a descriptor still to be flushed is closed by the flusher
    after its flush, so no copy of it is ever made. The feed's lines wait in the spool
    (or, without one or with it full, in memory) and are written in one write a round.
    """

    def __init__(
        self, feed: Feed, spool: _Spool | None = None, direct: bool = False,
        due: Callable[[bool], bool] | None = None,
    ) -> None:  # fmt: skip
        self.feed = feed
        self.spool = spool
        # called at the start of each round (True: the last): events written late;
        # whether more are due at once (then the next round comes after a tick)
        self.due = due
        # lines written to the feed where they are recorded, not with the next batch
        self.direct = direct
        self._cond = threading.Condition()
        self._sync: dict[int, int] = {}  # descriptor -> device, flushed in the next batch
        self._per_device: dict[int, int] = {}  # device -> how many of _sync are on it
        # device -> histories handed for the next batch that its syncfs will flush: a
        # file system with SYNCFS_BATCH of them kept open needs no more (each open
        # history is one more descriptor every task's fork copies and closes)
        self._by_fs: dict[int, int] = {}
        self._flushing: dict[int, int] = {}  # the batch being flushed now
        self._close: list[int] = []  # retired while a flush of theirs was pending
        self._lines: list[bytes] = []  # the feed's that did not go to the spool
        self._more_due = False
        self._waiting = False
        self._stopping = False
        self._one_round = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="batchingest-events", daemon=True)
        self._thread.start()

    def lines(self, lines: bytes) -> None:
        """Add lines to the feed with the next batch (direct: now)."""
        with self._cond:
            if not self.direct:
                # once one batch is kept in memory the next ones are too: still in order
                if self._lines or self.spool is None or not self.spool.add(lines):
                    self._lines.append(lines)
                self._wake()
                return
        self._write_feed(lines)

    def sync(self, fd: int, device: int) -> None:
        """fsync this history with the next batch (fd stays the caller's: see retire)."""
        with self._cond:
            if fd in self._sync:
                return
            if self._per_device.get(device, 0) >= SYNCFS_BATCH and fs.has_syncfs():
                self._by_fs[device] = self._by_fs.get(device, 0) + 1  # fd not needed
                return
            if len(self._sync) + len(self._close) < MAX_PENDING:
                self._per_device[device] = self._per_device.get(device, 0) + 1
                # (a disk this far behind: the rest is left to the kernel's writeback
                # rather than held open)
                self._sync[fd] = device
                self._wake()

    def retire(self, fd: int) -> None:
        """The caller is done with fd: closed now, or after the flush still due for it."""
        with self._cond:
            if fd in self._sync or fd in self._flushing:
                self._close.append(fd)
                return
        os.close(fd)

    def _wake(self) -> None:
        if self._waiting:  # (under the lock) no notify, no system call, while it sleeps
            self._waiting = False
            self._cond.notify()

    def _run(self) -> None:
        last = 0.0
        while True:
            with self._cond:
                if not (self._sync or self._close or self._lines or self._stopping
                        or self._more_due
                        or (self.spool is not None and self.spool.waiting())):  # fmt: skip
                    self._waiting = True
                    self._cond.wait(FLUSH_IDLE)
                    self._waiting = False
                stopping = self._stopping
            # gather what comes within a tick: one flush for many moves, fewer journal
            # commits competing with the processor's own fsync of JOB
            pause = last + FLUSH_TICK - time.monotonic()
            if pause > 0 and not stopping:
                time.sleep(pause)
            last = time.monotonic()
            if self._round():
                return

    def _round(self, final: bool = False) -> bool:
        """Flush what was handed so far, then close what waited for it; whether to stop.

        One round at a time (flush() may run one too), so the feed keeps the order in
        which lines were handed. final: the last one (stop); lines handed after it are
        written at once, since nothing would write them from the spool, which is removed.
        """
        if self.due is not None:  # (job work: not under _one_round, which notes wait for)
            try:
                self._more_due = self.due(final)
            except Exception:
                log.exception("writing late events failed")
        with self._one_round:
            self._write_lines(final)
            with self._cond:
                batch = self._flushing = self._sync
                closing, self._sync, self._close = self._close, {}, []
                by_fs, self._by_fs, self._per_device = self._by_fs, {}, {}
                stopping = self._stopping
            self._flush(batch, by_fs)
            with self._cond:
                self._flushing = {}
            for fd in closing:
                os.close(fd)
        return stopping

    def _write_lines(self, final: bool = False) -> None:
        """Write the feed's lines handed so far (in a round: under _one_round)."""
        with self._cond:
            self.direct = self.direct or final
            spooled, upto = (b"", 0) if self.spool is None else self.spool.pending()
            lines, self._lines = self._lines, []
        self._write_feed(spooled + b"".join(lines))
        if self.spool is not None:
            with self._cond:
                self.spool.written(upto)

    def write_lines(self) -> None:
        """Write the feed's lines handed so far now, without waiting for the tick; the
        histories are flushed with the next round as before."""
        with self._one_round:
            self._write_lines()

    def flush(self) -> None:
        """Write and flush everything handed so far, now."""
        self._round()

    def _write_feed(self, lines: bytes) -> None:
        if lines:
            try:
                self.feed.append(lines)
            except OSError as e:
                log.warning("%d events not in the feed: %s", lines.count(b"\n"), e.strerror or e)

    def _flush(self, batch: dict[int, int], by_fs: dict[int, int]) -> None:
        """fsync each history, or, for many on one file system, one syncfs of it; then
        the feed, unless that syncfs covered it. by_fs: how many more histories on each
        file system (closed already) its syncfs is to flush."""
        by_device: dict[int, list[int]] = {}
        for fd, device in batch.items():
            by_device.setdefault(device, []).append(fd)
        synced: set[int] = set()
        for device, group in by_device.items():
            try:
                if len(group) >= SYNCFS_BATCH and fs.syncfs(group[0]):
                    synced.add(device)
                elif by_fs.get(device):  # (syncfs failed) the closed ones: all of it
                    os.sync()
                    synced.add(device)
                else:
                    for fd in group:
                        os.fsync(fd)
            except OSError as e:
                log.warning("cannot flush job histories: %s", e.strerror or e)
        try:
            self.feed.sync(skip=synced)
        except OSError as e:
            log.warning("cannot flush the event feed: %s", e.strerror or e)

    def stop(self) -> None:
        """Flush everything handed, close what was retired, and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        self._round(final=True)  # what came during the last round


# -- the recorder ---------------------------------------------------------------------

_Planned = list[tuple[Code, str, dict[str, Any]]]
_Kept = tuple[int, int]  # a history kept open: its descriptor and its device


def _most_waiting() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return MAX_WAITING if soft == resource.RLIM_INFINITY else min(MAX_WAITING, soft // 8)


class Recorder:
    """Writes every event to the job's history and to the feed (attach() to a store)."""

    def __init__(self, store: Store, keep_days: int = 7) -> None:
        self.store = store
        self.keep_days = keep_days
        self.feed: Feed | None = None
        self._flusher: _Flusher | None = None
        self._unsubscribe: Callable[[], None] | None = None
        # one job's events are written one after another (a claim's waits for the API's
        # queue move to be recorded): striped so that the set never grows
        self._locks = [threading.RLock() for _ in range(64)]
        self._warned: set[str] = set()
        # histories of the jobs this process holds, open from the claim to the final move
        self._held: dict[str, _Kept] = {}
        # histories opened when a job moved in by hand was seen in queue/: its claim here
        # takes the descriptor over (_held) rather than opening the folder and file again
        self._waiting: dict[str, _Kept] = {}
        # histories made ready by a worker waiting for a task slot (ready()): the claim
        # takes the descriptor over, so the file is not made on the slot's time; with
        # the folder's ctime before and after the file was made: when the job entered
        # queue/, which a deadline counts from, is the first (entered_before_ready)
        self._ready: dict[str, tuple[_Kept, tuple[float, float]]] = {}
        # the names in queue/ at the last look (see seen_queued)
        self._queued: set[str] = set()
        # jobs found there by hand whose QUEUED is not written yet: when first seen (the
        # event's time, and monotonic), until their claim or QUEUED_DELAY
        self._seen: dict[str, tuple[str, float]] = {}
        self._seen_writing = threading.Lock()  # one _write_seen at a time
        self._seen_closed = False
        # names whose history this process saw end in the queue state: a claim of one
        # need not read the history to know whether its QUEUED is written
        self._ends_queued: set[str] = set()
        self._queued_lock = threading.Lock()
        self._most_waiting = _most_waiting()
        # the main process of several API processes: the API's events (note) are in the
        # feed before the response, as the extra processes' are, so a client's next
        # request, served by another process, records its event after them
        self.notes_at_once = False
        self._pid = os.getpid()

    def attach(self) -> None:
        """Open the feed and listen to the store's moves.

        StoreError if ROOT/.events is not a folder (a link would send the feed, and
        the removal of old files, wherever it points).
        """
        try:
            self.feed = Feed(self.store.root_fd, FEED, keep_days=self.keep_days)
        except OSError as e:
            where = self.store.service_path("events")
            raise StoreError(f"{where} cannot be the event feed's folder: {e.strerror}") from e
        self.feed.prune()
        # a store whose moves another process makes (an extra API process): that
        # process's recorder writes their events, so ours are written at once, or a
        # job's QUEUED could reach the feed before the CREATED recorded here
        direct = self.store.mover is not None
        spool = None if direct else self._open_spool(self.feed)
        self._flusher = _Flusher(self.feed, spool, direct, self._write_seen_in_round)
        self._unsubscribe = self.store.subscribe(self.on_move)
        _RECORDERS[self.store] = self

    def close(self) -> None:
        """Stop listening, flush everything written and close the feed."""
        _RECORDERS.pop(self.store, None)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        with self._seen_writing:
            self._seen_closed = True
        if self._flusher is not None:
            self._flusher.stop()
            if self._flusher.spool is not None:
                self._flusher.spool.close()
            self._flusher = None
        if self.feed is not None:
            self.feed.close()
            self.feed = None
        for name in list(self._waiting):
            self._forget_waiting(name)
        for name in list(self._ready):
            self.unready(name)

    def _open_spool(self, feed: Feed) -> _Spool | None:
        """This process's spool, after the lines of recorders killed here are replayed
        (here: on this host id, which a container recreated under a new name keeps)."""
        host = self.store.owner.host
        try:
            replayed = replay_spools(feed, host)
            if replayed:
                log.info("%d events of a recorder that was killed written to the feed", replayed)
            return _Spool(feed.dir_fd, host)
        except OSError as e:  # the feed's lines are kept in memory until written
            log.warning("no spool for the event feed: %s", e.strerror or e)
            return None

    def flush(self) -> None:
        """Write the QUEUED of every job seen queued by hand and the feed's lines
        gathered so far, and flush the histories handed."""
        self._write_seen(True)
        if self._flusher is not None:
            self._flusher.flush()

    def lock_of(self, name: str) -> threading.RLock:
        return self._locks[hash(name) % len(self._locks)]

    # -- writing ---------------------------------------------------------------------

    def record(
        self, name: str, dir_fd: int | None, code: Code, state: str, description: str,
        details: dict[str, Any] | None = None, *, durable: bool = False, held: str | None = None,
        history: _Kept | None = None, after_task: bool = False, at: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Append one event to the job's history (dir_fd; None: feed only) and the feed.

        held: the name under which this process holds the job; its history then stays
        open from the claim to the final move, instead of being opened for each event.
        history: the history already open (the caller keeps it). after_task: a task ran
        since the last event, so the kept history may have been removed (looked at).
        durable: a state change, fsync-ed with the flusher's next batch. at: its time, if
        not now.
        """
        event = make_event(code, state, description, details, at)
        self._write(name, dir_fd, [encode(event)], durable, held, history, after_task)
        return event

    def _write(
        self, name: str, dir_fd: int | None, lines: list[bytes], durable: bool,
        held: str | None = None, history: _Kept | None = None, after_task: bool = False,
    ) -> None:  # fmt: skip
        """Append lines to the job's history in one write, and hand them to the feed."""
        kept, own = history, False
        if kept is None:
            kept, own = self._history_fd(name, dir_fd, held, after_task)
        if kept is not None:
            try:
                # one write: lines of several writers never interleave
                os.write(kept[0], lines[0] if len(lines) == 1 else b"".join(lines))
            except OSError as e:
                log.warning("%s: events not in its history: %s", name, e.strerror or e)
        flusher = self._flusher
        if flusher is None:
            if kept is not None and own:
                os.close(kept[0])
            return
        # the same lines with the job's name first (names need no escaping)
        prefix = b'{"job":"' + name.encode() + b'",'
        flusher.lines(b"".join([prefix + line[1:] for line in lines]))
        if kept is not None:
            if durable:
                flusher.sync(*kept)
            if own:
                flusher.retire(kept[0])

    def _history_fd(
        self, name: str, dir_fd: int | None, held: str | None, after_task: bool = False
    ) -> tuple[_Kept | None, bool]:
        """The history's descriptor, and whether the caller gives it up (else it is kept).

        Only a task (the job's own code) removes a kept history while the job is held:
        whether it is still linked is looked at after one, not before every event.
        """
        if held is None:
            return (None if dir_fd is None else self._open_history(name, dir_fd)), True
        kept = self._held.get(held)
        if kept is not None and (not after_task or os.fstat(kept[0]).st_nlink > 0):
            return kept, False
        if dir_fd is None:
            return None, True
        self.release(held)  # none yet, or a task removed the file: a new one
        kept = self._open_history(name, dir_fd)
        if kept is not None:
            self._held[held] = kept
        return kept, False

    def release(self, held: str) -> None:
        """The job held as `held` left processing/: give up its kept history."""
        kept = self._held.pop(held, None)
        if kept is not None:
            self._give_up(kept[0])

    def _give_up(self, fd: int) -> None:
        """Close a kept history, after the flush still due for it."""
        if self._flusher is not None:
            self._flusher.retire(fd)
        else:
            os.close(fd)

    def _open_history(self, name: str, dir_fd: int, sized: list[int] | None = None) -> _Kept | None:
        """open_history_stat, or None (said once per job) if it cannot be kept; sized
        gets the file's size."""
        try:
            fd, size, device = open_history_stat(dir_fd)
        except OSError as e:
            if name not in self._warned:
                self._warned.add(name)
                why = e.strerror or str(e)
                log.warning("%s: its history is not kept: %s %s", name, EVENTS_FILE, why)
            return None
        if sized is not None:
            sized.append(size)
        return fd, device

    def open_current(self, name: str) -> tuple[Job, int] | None:
        """The job of that name and its folder's descriptor, wherever it is now."""
        for _ in range(3):
            try:
                job = self.store.find(name)
            except InvalidName:
                return None
            if job is None:
                return None
            try:
                return job, self.store.open_job(job)
            except FileNotFoundError:
                continue  # moved meanwhile: look again
            except OSError:
                return None
        return None

    def note(
        self, name: str, code: Code, description: str, details: dict[str, Any] | None = None
    ) -> None:
        """An event of a job known by name (API, webhooks), in its current state."""
        with self.lock_of(name):
            found = self.open_current(name)
            if found is None:
                return
            job, dir_fd = found
            try:
                if job.state == State.QUEUE:
                    self._queued_before(job.name, dir_fd)
                self.record(job.name, dir_fd, code, job.status, description, details)
            finally:
                os.close(dir_fd)
        flusher = self._flusher
        if self.notes_at_once and flusher is not None:
            flusher.write_lines()

    # -- moves -------------------------------------------------------------------------

    def on_move(self, job: Job, old_state: str | None) -> None:
        """The store's listener: the events of one move, before the move returns."""
        original = getattr(_hint, "finishing", None) if old_state == State.PROCESSING else None
        _hint.finishing = None
        if original is not None and not job.name.startswith(original):
            original = None  # left over from a move that failed: not this job's
        with self.lock_of(original or job.name):
            claimed = old_state == State.QUEUE and job.state == State.PROCESSING
            # a claim's folder is open already: the claimer lends it
            claims = self.store.moving_folder() if claimed else None
            # a job this process held, or saw in queue/: its history is open already
            kept = original in self._held or (
                claimed
                and self._take_over(self._waiting.pop(job.name, None), job.name, claims) is not None
            )
            ready = None
            if claimed and not kept:
                # one left by a namesake whose final move never came (removed by hand)
                self.release(job.name)
                made = self._ready.pop(job.name, None)
                ready = self._take_over(None if made is None else made[0], job.name, claims)
            elif claimed:  # the one kept since seen is used: the ready one is not needed
                self._give_up_ready(job.name)
            lent = None if kept else claims
            dir_fd = None if kept or lent is not None else self._open_moved(job)
            folder = dir_fd if lent is None else lent
            held = job.name if claimed else original
            at = self._take_seen(job.name) if claimed else None
            try:
                if old_state == State.QUEUE and not claimed:  # unqueued (cancel, deadline)
                    self._queued_before(job.name, folder)
                planned = self._planned(job, old_state, original, folder, kept, ready)
                # a QUEUED written late (a hand-queued job, seen when taken) says queue,
                # and when it was seen
                lines = [
                    encode(make_event(code, "queue", description, details, at)
                           if code is Code.QUEUED
                           else make_event(code, job.status, description, details))
                    for code, description, details in planned
                ]  # fmt: skip
                if lines:  # one write for a claim's QUEUED and CLAIMED
                    self._write(job.name, folder, lines, True, held)
            finally:
                if original is not None:
                    self.release(original)
                if dir_fd is not None:
                    os.close(dir_fd)

    def _take_over(self, kept: _Kept | None, name: str, folder: int | None) -> int | None:
        """A history opened before the claim (seen in queue/, or made ready) becomes the
        held one; its size now. None (closed) if it is not the `.events` of the claimed
        folder: removed, or its job swapped for a namesake meanwhile."""
        if kept is None:
            return None
        try:
            st = os.fstat(kept[0])
            there = None if folder is None else os.stat(EVENTS_FILE, dir_fd=folder,
                                                        follow_symlinks=False)  # fmt: skip
        except OSError:
            there = None
        # a link made meanwhile (`cp -al`) too: the claim then opens it as any other
        # (open_history_stat), which gives this job its own copy first
        if there is None or not fs.same_inode(st, there) or st.st_nlink != 1:
            self._give_up(kept[0])
            return None
        self.release(name)
        self._held[name] = kept
        return st.st_size

    def _forget_waiting(self, name: str) -> None:
        with self.lock_of(name):
            kept = self._waiting.pop(name, None)
            if kept is not None:
                self._give_up(kept[0])

    def _keep_waiting(self, name: str, kept: _Kept) -> None:
        """Keep a queued job's history open for its claim (if there is room)."""
        if len(self._waiting) < self._most_waiting and name not in self._waiting:
            self._waiting[name] = kept
        else:
            self._give_up(kept[0])

    def ready(self, name: str) -> None:
        """Make the history of a queued job about to be claimed here (a worker took it and
        waits for a task slot), kept for the claim: a new file costs more than all of a
        claim's other writes, and is made here off the slot's time. Nothing is written.

        The file is made outside the job's lock, which is one of a few shared by all
        names: a claim of another job must not wait for it."""
        with self.lock_of(name):
            if name in self._ready or name in self._waiting or name in self._held:
                return
            if len(self._ready) >= self._most_waiting:
                return
        try:
            job = Job(name, State.QUEUE, self.store.job_path(State.QUEUE, name))
            dir_fd = self.store.open_job(job)
        except (OSError, ValueError):
            return  # taken or gone meanwhile: the claim finds out
        try:
            before = os.fstat(dir_fd)
            # only a new file: one already there may need mending (a torn last line, a
            # link to another job's), which is done under the job's lock by the claim
            fd = fs.create_new(dir_fd, EVENTS_FILE, os.O_RDWR | os.O_APPEND)
            if fd is None:
                return
            kept = (fd, _device_or_close(fd))
            # the folder's mtime is the queue's order (Store.queued): kept as it was
            with contextlib.suppress(OSError):  # (not the owner: EPERM)
                os.utime(dir_fd, ns=(before.st_atime_ns, before.st_mtime_ns))
            times = (before.st_ctime, os.fstat(dir_fd).st_ctime)
        except OSError:
            return  # the claim tries again, and says why
        finally:
            os.close(dir_fd)
        with self.lock_of(name):
            if name in self._ready:  # (only this worker claims it: never expected)
                self._give_up(kept[0])
            else:
                self._ready[name] = (kept, times)

    def entered_before_ready(self, name: str, ctime: float | None) -> float | None:
        """When the queued job entered queue/, given its folder's ctime now: the ctime
        from before its history was made ready, if nothing changed the folder since."""
        with self.lock_of(name):
            made = self._ready.get(name)
        return made[1][0] if made is not None and ctime == made[1][1] else ctime

    def _give_up_ready(self, name: str) -> None:  # under lock_of(name)
        made = self._ready.pop(name, None)
        if made is not None:
            self._give_up(made[0][0])

    def unready(self, name: str) -> None:
        """The job made ready was not claimed here (taken elsewhere, gone, stopping)."""
        with self.lock_of(name):
            self._give_up_ready(name)

    def _open_moved(self, job: Job) -> int | None:
        try:
            return self.store.open_job(job)
        except FileNotFoundError:
            found = self.open_current(job.name)  # it moved on before we ran
            return None if found is None else found[1]
        except OSError:
            return None

    def _planned(
        self, job: Job, old: str | None, original: str | None, dir_fd: int | None, kept: bool,
        ready: int | None = None,
    ) -> _Planned:  # fmt: skip
        new = job.state
        if old == State.QUEUE and new == State.PROCESSING:
            return self._claimed(job.name, dir_fd, seen=kept, ready=ready)
        if old == State.PROCESSING and new == State.QUEUE:
            self._ends_queued.add(job.name)
            if original is not None:
                text = "Back in queue/: the service is stopping; it resumes at its unfinished task."
                return [(Code.QUEUED, text, {"by": "service", "from": "processing"})]
            text = "Back in queue/: the processor holding it is gone; it resumes at its task."
            return [(Code.RECOVERED, text, {"from": "processing"})]
        if old == State.PROCESSING and new in FINAL:
            planned: _Planned = [
                (Code.SUCCEEDED, "All tasks are done.", {})
                if new == State.SUCCESS
                else (Code.FAILED, "The job stopped: see its last task event or its LOG.", {})
            ]
            if original is not None and original != job.name:
                text = f"Renamed to {job.name}: a job named {original} was already in {new}/."
                planned.append((Code.RENAMED, text, {"from": original, "to": job.name}))
            return planned
        if new == State.QUEUE and old is not None:
            self._ends_queued.add(job.name)
            was = status(old)
            return [(Code.QUEUED, f"Queued by the API (it was {was}).", {"by": "api", "from": was})]
        return []

    def seen_queued(self, names: list[str]) -> None:
        """A processor listed queue/: note the jobs that came in by hand.

        Only names new since the last look count, and a job whose history already ends
        in the queue state (the API queued it, or it was seen before a restart) gets
        nothing. A new one's QUEUED (by hand), timed now, is written with its claim, or
        once it has waited QUEUED_DELAY (_write_seen): a busy processor opens and writes
        its history once, not twice.
        """
        now, at = time.monotonic(), _now()
        with self._queued_lock:
            fresh = [name for name in names if name not in self._queued]
            self._queued = set(names)
            self._ends_queued &= self._queued  # the others left queue/ meanwhile
            for name in [name for name in self._seen if name not in self._queued]:
                del self._seen[name]
            for name in fresh:
                if name not in self._ends_queued:
                    self._seen.setdefault(name, (at, now))
            # a copy first: claims in other threads take names out of _waiting meanwhile
            gone = [name for name in list(self._waiting) if name not in self._queued]
        for name in gone:  # taken elsewhere, or moved back by hand: not claimed here
            self._forget_waiting(name)
        self._write_seen(False)

    def _take_seen(self, name: str) -> str | None:
        """When a job now claimed was first seen in queue/, if its QUEUED is not written."""
        with self._queued_lock:
            seen = self._seen.pop(name, None)
        return None if seen is None else seen[0]

    def _queued_before(self, name: str, dir_fd: int | None) -> None:
        """The QUEUED (by hand) still waiting for a job seen in queue/ (_seen), written
        now, before another event of its (under its lock): a note while it waits, or a
        move out of queue/ other than a claim (a cancel, a deadline)."""
        at = self._take_seen(name)
        if at is None or dir_fd is None or name in self._ends_queued:
            return
        for code, text, details in self._hand_queued(last_state(dir_fd)):
            self.record(name, dir_fd, code, "queue", text, details, durable=True, at=at)

    def _write_seen_in_round(self, final: bool) -> bool:
        """The flusher's share: a bounded number a round, which flushes meanwhile wait
        for (10,000 jobs found queued at start are written over many rounds)."""
        return self._write_seen(final, None if final else SEEN_A_ROUND)

    def _write_seen(self, everything: bool, most: int | None = None) -> bool:
        """Write QUEUED (by hand) for the jobs seen in queue/ at least QUEUED_DELAY ago
        (everything: all; most: the oldest that many) and not claimed since; their
        histories kept for the claim. Whether more were due than written.

        One call at a time: a listing thread's still running when the recorder closes
        is waited for (and none starts after), so that the last round writes the rest.
        """
        with self._seen_writing:
            if self._seen_closed and not everything:
                return False
            return self._write_due(everything, most)

    def _write_due(self, everything: bool, most: int | None) -> bool:
        with self._queued_lock:
            if not self._seen:
                return False
            oldest = time.monotonic() - (0.0 if everything else QUEUED_DELAY)
            due = [(name, at) for name, (at, seen) in self._seen.items() if seen <= oldest]
            more = most is not None and len(due) > most
            if more:
                del due[most:]  # (a dict keeps the order they were seen in)
            for name, _ in due:
                del self._seen[name]
        for name, at in due:
            with self.lock_of(name):
                if name in self._ends_queued:
                    continue
                try:
                    job = Job(name, State.QUEUE, self.store.job_path(State.QUEUE, name))
                    dir_fd = self.store.open_job(job)
                except (OSError, ValueError):
                    continue  # taken (its claim wrote it) or gone
                try:
                    self._seen_by_hand(name, dir_fd, at)
                finally:
                    os.close(dir_fd)
        return more

    def _seen_by_hand(self, name: str, dir_fd: int, at: str) -> None:
        """QUEUED (by hand) for a job found in queue/; its history kept for the claim."""
        size: list[int] = []
        kept = self._open_history(name, dir_fd, size)
        if kept is None:  # not kept (a link, say): the feed still gets the event
            for code, text, details in self._hand_queued(None):
                self.record(name, None, code, "queue", text, details, durable=True, at=at)
        else:
            last = _last_state_of(kept[0], size[0])
            if last == State.PROCESSING.status:
                # just moved out of processing/ (a recovery, a stopping service) and that
                # move's own event not written yet: not by hand. A job moved from there by
                # hand gets its QUEUED when it is claimed.
                self._give_up(kept[0])
                return
            for code, text, details in self._hand_queued(last):
                self.record(name, None, code, "queue", text, details, durable=True,
                            history=kept, at=at)  # fmt: skip
            self._keep_waiting(name, kept)
        self._ends_queued.add(name)

    @staticmethod
    def _hand_queued(last: str | None) -> _Planned:
        """QUEUED by hand, unless the history already ends in the queue state."""
        if last == "queue":
            return []
        details: dict[str, Any] = {"by": "hand"}
        if last is not None:
            details["from"] = last
        return [(Code.QUEUED, "Queued by hand: found in queue/.", details)]

    def _claimed(
        self, name: str, dir_fd: int | None, seen: bool = False, ready: int | None = None
    ) -> _Planned:
        """CLAIMED, after a QUEUED (by hand) if the job was not seen queued.

        `seen`: its history was kept since it was seen in queue/, so its QUEUED is written.
        `ready`: the size of its history made ready for the claim (_take_over), now held.
        A listing taken just after the claim's rename may already have taken the name out
        of _ends_queued (that runs in the helper thread, without the job's lock): the
        kept history says it all the same, and no second QUEUED is written.
        """
        planned: _Planned = []
        if seen or name in self._ends_queued:
            self._ends_queued.discard(name)
        elif ready is not None:  # not seen queued by this process: look
            planned = self._hand_queued(_last_state_of(self._held[name][0], ready))
        elif dir_fd is not None:
            planned = self._hand_queued(self._hold_history(name, dir_fd))
        else:
            planned = self._hand_queued(None)
        planned.append((Code.CLAIMED, f"Taken by the processor on {HOST} (pid {self._pid}).",
                        {"host": HOST, "pid": self._pid}))  # fmt: skip
        return planned

    def _hold_history(self, name: str, dir_fd: int) -> str | None:
        """Open the history of a job just claimed, kept from now on (_held); the state
        after its last move, read from the open file (nothing to read in a new one)."""
        size: list[int] = []
        kept = self._open_history(name, dir_fd, size)
        if kept is None:
            return None
        self._held[name] = kept  # (on_move gave up any kept before)
        return _last_state_of(kept[0], size[0])


_RECORDERS: weakref.WeakKeyDictionary[Store, Recorder] = weakref.WeakKeyDictionary()
_hint = threading.local()


def recorder_for(store: Store) -> Recorder | None:
    return _RECORDERS.get(store)


# -- hooks: each does nothing where no recorder is attached ------------------------------

_Hook = TypeVar("_Hook", bound=Callable[..., None])


def _quiet(hook: _Hook) -> _Hook:
    """A hook never stops the work it reports on: an unexpected error is only logged."""

    @functools.wraps(hook)
    def guarded(*args: Any, **kwargs: Any) -> None:
        try:
            hook(*args, **kwargs)
        except Exception:
            log.exception("recording an event failed")

    return cast(_Hook, guarded)


@_quiet
def note(
    store: Store, name: str, code: Code, description: str, details: dict[str, Any] | None = None
) -> None:
    recorder = _RECORDERS.get(store)
    if recorder is not None:
        recorder.note(name, code, description, details)


def created(store: Store, job: Job, details: dict[str, Any] | None = None) -> None:
    """CREATED; details add to {"by": "api"} (a staging request's requester, say)."""
    who = f" for {details['requester']}" if details and "requester" in details else ""
    note(
        store, job.name, Code.CREATED, f"Created by the API{who}.", {"by": "api", **(details or {})}
    )


def file_uploaded(store: Store, name: str, path: str, size: int, sha256: str) -> None:
    note(store, name, Code.FILE_UPLOADED, f"File {path} uploaded ({size} bytes).",
         {"path": path, "size": size, "sha256": sha256})  # fmt: skip


def file_deleted(store: Store, name: str, path: str) -> None:
    note(store, name, Code.FILE_DELETED, f"File {path} deleted.", {"path": path})


def queue(store: Store, name: str) -> tuple[Job, bool]:
    """store.queue, with the QUEUED event written before a processor's CLAIMED."""
    recorder = _RECORDERS.get(store)
    if recorder is None:
        return store.queue(name)
    with recorder.lock_of(name):
        return store.queue(name)


@_quiet
def seen_queued(store: Store, names: list[str]) -> None:
    """The names a processor found in queue/ (oldest first)."""
    recorder = _RECORDERS.get(store)
    if recorder is not None:
        recorder.seen_queued(names)


@_quiet
def ready(store: Store, name: str) -> None:
    """A worker took the queued job `name` and waits for a task slot (see Recorder.ready)."""
    recorder = _RECORDERS.get(store)
    if recorder is not None:
        recorder.ready(name)


def entered_before_ready(store: Store, name: str, ctime: float | None) -> float | None:
    """When queue/NAME got there, given its ctime now (see Recorder.entered_before_ready)."""
    recorder = _RECORDERS.get(store)
    return ctime if recorder is None else recorder.entered_before_ready(name, ctime)


@_quiet
def unready(store: Store, name: str) -> None:
    """The job made ready was not claimed here after all."""
    recorder = _RECORDERS.get(store)
    if recorder is not None:
        recorder.unready(name)


@_quiet
def task_started(store: Store, hold: Hold, task: str) -> None:
    recorder = _RECORDERS.get(store)
    if recorder is not None:
        recorder.record(hold.name, hold.dir_fd, Code.TASK_STARTED, "processing",
                        f"Task {task} started.", {"task": task}, held=hold.name)  # fmt: skip


@_quiet
def task_ended(store: Store, hold: Hold, result: TaskResult) -> None:
    recorder = _RECORDERS.get(store)
    if recorder is None:
        return
    task, seconds = result.task, round(result.seconds, 3)
    details: dict[str, Any] = {"task": task, "seconds": seconds}
    if result.ok:
        code = Code.TASK_SUCCEEDED
        added = f", adding {', '.join(result.added)}" if result.added else ""
        text = f"Task {task} succeeded in {seconds:.3f} s{added}."
        details["added"] = result.added
    else:
        code = Code.TASK_TIMED_OUT if result.reason.startswith("timed out") else Code.TASK_FAILED
        text = f"Task {task} failed: {result.reason}."
        details.update(exit_code=result.exit_code, reason=result.reason)
    recorder.record(hold.name, hold.dir_fd, code, "processing", text, details, held=hold.name,
                    after_task=True)  # fmt: skip


@_quiet
def let_go(store: Store, name: str) -> None:
    """The processor gave up the held job `name` without moving it out (another host
    holds it now, or it was removed): its history, kept open since the claim, is closed."""
    recorder = _RECORDERS.get(store)
    if recorder is not None:
        with recorder.lock_of(name):
            recorder.release(name)


def finishing(store: Store, name: str) -> None:
    """The processor is about to move the held job `name` out of processing/."""
    if store in _RECORDERS:
        _hint.finishing = name


def webhook_delivered(store: Store, name: str, state: str, url: str, outcome: str) -> None:
    note(store, name, Code.WEBHOOK_DELIVERED, f"Webhook {state} event delivered to {url}.",
         {"state": state, "url": url, "outcome": outcome})  # fmt: skip


def webhook_failed(store: Store, name: str, state: str, url: str, reason: str) -> None:
    note(store, name, Code.WEBHOOK_FAILED, f"Webhook {state} event not delivered to {url}: "
         f"{reason}.", {"state": state, "url": url, "reason": reason})  # fmt: skip


def cancel_requested(store: Store, name: str, by: str = "api") -> None:
    note(store, name, Code.CANCEL_REQUESTED, f"Cancel requested by the {by}.", {"by": by})


def canceled(store: Store, name: str, task: str | None = None) -> None:
    text = f"Canceled while task {task} ran." if task else "Canceled."
    note(store, name, Code.CANCELED, text, {"task": task})


def deadline_exceeded(store: Store, name: str, deadline: str) -> None:
    note(store, name, Code.DEADLINE_EXCEEDED, f"The deadline {deadline} has passed.",
         {"deadline": deadline})  # fmt: skip
