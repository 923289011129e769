"""The outbox: webhook events kept on disk until every URL has had its delivery.

One file per event in ROOT/.outbox, named `<seq>-<event_id>.json`: a first line of JSON
(the `Event`: job, state, URLs) and then the body exactly as it is sent, so the body is
stored once however many URLs there are. When one URL of several is done (delivered,
or finally failed) an empty marker `<file>.done<i>` says so, so a restart sends only to
the others; when all are done the event file and its markers are removed. A finally
failed delivery is copied to ROOT/.outbox/failed as an event file of its own with just
that URL and the reason, ready to be moved back.

Writes happen on one writer thread, never on the event loop. The thread takes every
event waiting at once (one batch) and writes each to a hidden temporary file, renames it
into place and only then fsyncs it (see write_event). A move waits for its batch
(`Writer.submit`), which is how an event is on disk before the move is reported done.
An event that cannot be written (a full disk) stays waiting in memory and is tried
again, with every new batch and every RETRY_WRITE seconds: it is never dropped while
the service runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from batchingest import fs

log = logging.getLogger("batchingest.webhooks")

FAILED = "failed"
# seconds between attempts to write events that could not be written (disk full)
RETRY_WRITE = 1.0
# an outbox file bigger than this is not ours (a body is at most ~2 MiB)
FILE_MAX_BYTES = 16 << 20
_DONE = ".done"


@dataclass(frozen=True)
class Event:
    """The header of one event file; `file` is its name in the outbox."""

    seq: int
    event_id: str
    job: str
    key: str
    state: str
    urls: tuple[str, ...]
    file: str = field(default="", compare=False)

    @staticmethod
    def name_for(seq: int, event_id: str) -> str:
        return f"{seq:020d}-{event_id}.json"

    def dumps(self, body: bytes, **extra: object) -> bytes:
        head = asdict(self)
        del head["file"]
        head["urls"] = list(self.urls)
        head["size"] = len(body)  # a file cut short by a crash is recognised
        return json.dumps({**head, **extra}).encode() + b"\n" + body


def parse_event(name: str, data: bytes) -> tuple[Event, bytes] | None:
    """An event file's header and body, or None if it is not one (or is cut short)."""
    head, sep, body = data.partition(b"\n")
    try:
        h = json.loads(head)
        # files of earlier versions held one URL each, as "url"
        urls = tuple(h["urls"]) if "urls" in h else (h["url"],)
        if not sep or not urls or not all(isinstance(u, str) for u in urls):
            return None
        if "size" in h and h["size"] != len(body):
            return None
        event = Event(int(h["seq"]), str(h["event_id"]), str(h["job"]), str(h["key"]),
                      str(h["state"]), urls, name)  # fmt: skip
    except (ValueError, KeyError, TypeError):
        return None
    return event, body


@dataclass
class _Ticket:
    """What a waiting mover learns: its events were attempted, and whether all got in."""

    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = True


@dataclass
class _Item:
    event: Event
    body: bytes
    ticket: _Ticket


def write_event(dir_fd: int, name: str, data: bytes) -> None:
    """Put a new event file in place durably, with one fsync.

    The content is written under a hidden temporary name and renamed into place, so no
    reader ever sees a partial file. The fsync comes after the rename: on journalling
    file systems (ext4, XFS, btrfs) it commits the new name together with the content
    and with the job's move made just before, where fsync-then-rename would leave the
    name to the next journal commit (seconds later) and a folder fsync would cost a
    second flush. A crash before the fsync returns can leave a file cut short, whose
    move was never reported done; its recorded size gives it away at the next start.
    """
    tmp = fs.temp_name(name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        try:
            fs.write_all(fd, data)
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.fsync(fd)
    finally:
        os.close(fd)


class Outbox:
    """The outbox folder, reached through a descriptor opened once."""

    def __init__(self, path: os.PathLike[str] | str) -> None:
        os.makedirs(os.path.join(path, FAILED), exist_ok=True)
        self.path = os.fspath(path)
        self.fd = fs.open_root(path)
        self.failed_fd = fs.open_dir(self.fd, FAILED)

    def close(self) -> None:
        for fd in (self.failed_fd, self.fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def write(self, items: list[_Item]) -> tuple[int, OSError | None]:
        """Write items in order, durably; how many got in, and the error that stopped it."""
        written = 0
        for item in items:
            name = item.event.file
            try:
                write_event(self.fd, name, item.event.dumps(item.body))
            except OSError as e:
                if fs.lstat(self.fd, name) is not None:
                    # in place but not flushed (the fsync failed): written again later
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=self.fd)
                return written, e
            written += 1
        return written, None

    def read(self, name: str) -> tuple[Event, bytes] | None:
        """An event file, or None if it is gone or not an event file."""
        try:
            data = fs.read_file(self.fd, name, FILE_MAX_BYTES)
        except OSError:
            return None
        return parse_event(name, data) if data is not None else None

    def names(self) -> Iterator[str]:
        """Event file names, oldest first."""
        for entry in sorted(fs.entries(self.fd), key=lambda e: e.name):
            if entry.is_file and entry.name.endswith(".json"):
                yield entry.name

    def markers(self) -> dict[str, set[int]]:
        """Event file name -> the URL indexes already done, from one listing."""
        found: dict[str, set[int]] = {}
        for entry in fs.entries(self.fd):
            base, sep, index = entry.name.rpartition(_DONE)
            if sep and index.isdigit():
                found.setdefault(base, set()).add(int(index))
        return found

    def mark_done(self, name: str, index: int) -> None:
        """Remember that one URL of an event is done (lost in a crash: sent again)."""
        fd = os.open(f"{name}{_DONE}{index}", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600,
                     dir_fd=self.fd)  # fmt: skip
        os.close(fd)

    def remove(self, name: str, indexes: range) -> None:
        """Remove a finished event file, then its markers."""
        for rel in (name, *(f"{name}{_DONE}{i}" for i in indexes)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(rel, dir_fd=self.fd)

    def bury(self, event: Event, index: int, body: bytes, reason: str, at: str) -> str:
        """Keep a finally failed delivery in failed/ as an event file of its own."""
        stem = event.file.removesuffix(".json")
        name = f"{stem}-{index}.json"
        one = Event(event.seq, event.event_id, event.job, event.key, event.state,
                    (event.urls[index],), name)  # fmt: skip
        fs.write_atomic(self.failed_fd, name, one.dumps(body, failure=reason, failed_at=at))
        return name

    def set_aside(self, name: str) -> None:
        """Move a file that is not an event file into failed/ as it is."""
        os.replace(name, name, src_dir_fd=self.fd, dst_dir_fd=self.failed_fd)

    def sweep(self, markers: dict[str, set[int]], names: set[str]) -> None:
        """Remove what a crash can leave: markers whose event file is gone, and
        temporary files of writes cut off (a minute old: not another service's)."""
        for base, indexes in markers.items():
            if base not in names:
                for index in indexes:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{base}{_DONE}{index}", dir_fd=self.fd)
        old = time.time() - 60
        for entry in fs.entries(self.fd, hidden=True):
            is_temp = entry.name.startswith(".") and entry.name.endswith(fs.TEMP_SUFFIX)
            st = fs.lstat(self.fd, entry.name) if is_temp and entry.is_file else None
            if st is not None and st.st_mtime < old:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.name, dir_fd=self.fd)


class Writer:
    """The one thread writing events to the outbox, in batches, retrying what fails."""

    def __init__(self, outbox: Outbox, written: Callable[[list[Event]], None]) -> None:
        self.outbox = outbox
        self._written = written
        self._cond = threading.Condition()
        self._waiting: list[_Item] = []
        self._failing = False
        self._busy = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="webhook-outbox", daemon=True)
        self._thread.start()

    def submit(self, events: list[tuple[Event, bytes]], wait: bool) -> bool:
        """Queue events for writing; with wait, return once they were tried (True: in)."""
        ticket = _Ticket()
        with self._cond:
            self._waiting.extend(_Item(e, b, ticket) for e, b in events)
            self._cond.notify_all()
        if not wait:
            return True
        ticket.done.wait()
        return ticket.ok

    @property
    def healthy(self) -> bool:
        """The thread runs and nothing it was given is failing to be written."""
        with self._cond:
            return self._thread.is_alive() and not self._failing

    def pending(self) -> int:
        """Events not yet written (for tests and the service log)."""
        with self._cond:
            return len(self._waiting) + (1 if self._busy else 0)

    def flush(self, timeout: float) -> bool:
        """Wait until everything submitted so far is written; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._waiting and not self._busy, timeout)

    def stop(self, timeout: float) -> None:
        """Write what is waiting (for up to timeout), then end the thread."""
        self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                if not self._waiting or self._failing:
                    # after a failure, try again when a new event arrives or after a while
                    self._cond.wait(RETRY_WRITE if self._waiting else None)
                if not self._waiting:
                    continue
                batch = list(self._waiting)
                self._busy = True
            try:
                self._write(batch)
            except Exception:
                # a bug must not leave movers waiting forever: they go on, events stay
                log.exception("webhook outbox writer failed")
                with self._cond:
                    self._failing = True
                for item in batch:
                    item.ticket.ok = False
                    item.ticket.done.set()
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _write(self, batch: list[_Item]) -> None:
        count, error = self.outbox.write(batch)
        done, left = batch[:count], batch[count:]
        with self._cond:
            for item in done:
                self._waiting.remove(item)
            was_failing, self._failing = self._failing, error is not None
        if done:
            self._written([item.event for item in done])
        if error is not None:
            if not was_failing:
                reason = "the disk is full" if error.errno == errno.ENOSPC else error.strerror
                log.error(
                    "cannot write %d webhook event(s) to the outbox (%s): kept in memory, "
                    "retrying every %gs", len(left), reason or error, RETRY_WRITE,
                )  # fmt: skip
            for item in left:
                item.ticket.ok = False
        elif was_failing:
            log.warning("webhook outbox writable again: pending events written")
        for item in batch:
            item.ticket.done.set()
