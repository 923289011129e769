"""The built-in `transfer` task: carry out a transfer job's request (batchingest.transfers).

Run as `python -m batchingest.tasks.transfer` in the job folder, like any task. Reads
`TRANSFER.json`, rewrites `TRANSFER-PROGRESS.json`, appends every file copied to
`TRANSFERRED`, and explains itself on stdout (the job's LOG).

The request names endpoints; their folders come from `BATCHINGEST_TRANSFER_ENDPOINTS`
(set by the service), never from the job. Every file is reached beneath an endpoint
folder's descriptor through batchingest.fs: no symbolic link is followed (a link met in
a recursive copy is skipped and logged), no FIFO or device is opened, and a path with
`..` cannot even be written down. Copies use the staging copy engine (kernel copy, large
files in order with their writeback following step by step) into an unnamed file (or a
hidden `.batchingest-xfer-*` file) beside the target, flushed, then linked or renamed
into place, so no partial file ever shows under a real name. Small files are flushed in
groups of up to 4,096 with one syncfs (copyengine.group_size; fewer than 8 with an fsync
each); large ones with their own fsync. After each group is named, an fsync of the
folders that got names makes the names durable too.

Between files and steps the task looks for a cancel request (`.cancel` in the job
folder) and the request's deadline; either stops it with exit status 3 and the reason
in `fatal_error`. Exit status 1: some item failed (the first error in `fatal_error`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import json
import os
import queue
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batchingest import fs, transfers
from batchingest.copyengine import (
    LARGE,
    copy_fd,
    copy_flushing,
    copy_range,
    group_size,
    sha256_fd,
    syncfs_group,
)
from batchingest.endpoints import SERVICE_PREFIX, Endpoint, Endpoints, PathError, split_path
from batchingest.flags import env_bool

SAVE_EVERY = 0.5
PARALLEL = 2  # files copied at the same time
CHUNK = 256  # files of a folder handed to the copying threads at a time
PIECE = 16  # files one copying thread takes at a time
STEP = 16 << 20  # a Staccato transfer flushes and records its progress this often
SYNC_EXISTS, SYNC_SIZE, SYNC_MTIME, SYNC_CHECKSUM = range(4)
EXIT_FAILED, EXIT_STOPPED = 1, 3


class Stop(Exception):
    """Canceled, or past the deadline: code is CANCELED or DEADLINE_EXCEEDED."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description


class ItemError(Exception):
    """One file or item cannot be done; the others still are."""


def load_endpoints() -> Endpoints:
    raw = os.environ.get("BATCHINGEST_TRANSFER_ENDPOINTS") or "[]"
    return Endpoints([Endpoint(n, Path(p), bool(ro)) for n, p, ro in json.loads(raw)])


@dataclass
class Pending:
    """A complete copy waiting for its batch's flush: an unnamed file kept open (fd), or
    one under a hidden name (tmp)."""

    dir_fd: int
    tmp: str
    name: str
    record: str
    fd: int = -1
    flushed: bool = False  # fsync-ed on its own (a large file): its group needs no syncfs

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # an unnamed file disappears with its last descriptor
            self.fd = -1
        if self.tmp:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp, dir_fd=self.dir_fd)
            self.tmp = ""


class Copiers:
    """The copying threads: run a list of calls on them, wait for all (a thread pool
    without concurrent.futures, whose import, with logging's, cost every task's start
    about 10 ms of CPU). Started at the first list: a one-file transfer needs none."""

    def __init__(self, threads: int) -> None:
        self.size = threads
        self.threads: list[threading.Thread] = []
        self.calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()

    def run_all(self, calls: list[Callable[[], None]]) -> None:
        """Run every call, wait until all are done, then raise the first exception (in the
        order of calls) if any raised."""
        if not self.threads:
            self._start()
        done = threading.Semaphore(0)
        raised: list[BaseException | None] = [None] * len(calls)

        def one(i: int, call: Callable[[], None]) -> None:
            try:
                call()
            except BaseException as e:
                raised[i] = e
            finally:
                done.release()

        for i, call in enumerate(calls):
            self.calls.put(functools.partial(one, i, call))
        for _ in calls:
            done.acquire()
        for e in raised:
            if e is not None:
                raise e

    def _start(self) -> None:
        """Start the threads; fewer if the system gives fewer (none: EAGAIN, which
        fails the run with its reason instead of a traceback)."""
        for i in range(self.size):
            t = threading.Thread(target=self._work, name=f"copy-{i}", daemon=True)
            try:
                t.start()
            except RuntimeError:  # no thread to be had: go on with those started
                break
            self.threads.append(t)  # only started ones: shutdown joins each
        if not self.threads:
            raise OSError(errno.EAGAIN, "no thread could be started to copy with")

    def _work(self) -> None:
        while (call := self.calls.get()) is not None:
            call()

    def shutdown(self) -> None:
        for _ in self.threads:
            self.calls.put(None)
        for t in self.threads:
            t.join()
        self.threads = []


@dataclass
class Run:
    job_fd: int
    request: dict[str, Any]
    registry: Endpoints
    max_rate: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    pending: list[Pending] = field(default_factory=list)
    done_lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.counters = {k: 0 for k in transfers.COUNTERS}
        self.started = time.monotonic()
        self.moved = 0  # bytes copied by this run, for the rate limit
        self.last_save = 0.0
        self.last_check = 0.0
        self.temp_ids = itertools.count()
        deadline = self.request.get("deadline")
        self.verify = bool(self.request.get("verify_checksum"))
        self.preserve = bool(self.request.get("preserve_timestamp"))
        self.deadline = transfers.parse_time(deadline).timestamp() if deadline else None
        self.workers = Copiers(PARALLEL)
        self.lock = threading.Lock()
        self.unnamed: str | None = None  # how unnamed copies get names; "" if they cannot
        self.saving = threading.Lock()
        # copies named after one syncfs; what waits holds a descriptor, and so may the
        # chunk being copied and the open folders: two groups' worth
        self.group = group_size(2)
        # this job's unfinished copies: named so that a later run of the job finds them
        self.temp_prefix = f"{SERVICE_PREFIX}xfer-{self.request.get('id')}."
        # a run before this one was cut off (kill -9, power cut): look for its leftovers
        self.rerun = fs.lstat(self.job_fd, transfers.PROGRESS) is not None

    def remove_leftovers(self, dir_fd: int) -> None:
        """Unfinished copies of an earlier run of this job in a destination folder.

        Only this job's: the job is held by this run, so no other run of it is alive.
        """
        if not self.rerun:
            return
        for entry in list(fs.entries(dir_fd, hidden=True)):
            if entry.name.startswith(self.temp_prefix) and entry.is_file:
                with contextlib.suppress(OSError):
                    os.unlink(entry.name, dir_fd=dir_fd)

    # -- bookkeeping ---------------------------------------------------------------------

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counters[key] += n

    def save(self, *, force: bool = False, fatal: dict[str, str] | None = None) -> None:
        if not force and time.monotonic() - self.last_save < SAVE_EVERY:
            return
        # one writer at a time; a worker thread finding it busy need not wait
        if not self.saving.acquire(blocking=force):
            return
        try:
            self.last_save = time.monotonic()
            with self.lock:
                doc: dict[str, Any] = {**self.counters, "fatal_error": fatal}
            fs.write_atomic(self.job_fd, transfers.PROGRESS, json.dumps(doc).encode(),
                            durable=force, mode=0o644)  # fmt: skip
        finally:
            self.saving.release()

    def check(self, *, now: bool = False) -> None:
        """Stop if canceled or past the deadline (looked at every 50 ms at most)."""
        if not now and time.monotonic() - self.last_check < 0.05:
            return
        self.last_check = time.monotonic()
        # the deadline first: the processor stops a task past it with the same SIGTERM
        if self.deadline is not None and time.time() > self.deadline:
            raise Stop("DEADLINE_EXCEEDED", f"deadline {self.request.get('deadline')} passed")
        if _TERMINATED.is_set() or fs.lstat(self.job_fd, transfers.CANCEL) is not None:
            raise Stop("CANCELED", "canceled by request")

    def throttle(self, n: int) -> None:
        if self.max_rate <= 0:
            return  # the bytes moved matter to the rate limit only
        with self.lock:
            self.moved += n
        while True:
            self.check()
            ahead = self.moved / self.max_rate - (time.monotonic() - self.started)
            if ahead <= 0:
                return
            time.sleep(min(ahead, 0.05))

    def endpoint(self, name: Any, write: bool) -> Endpoint:
        ep = self.registry.find(str(name))
        if ep is None:
            raise ItemError(f"endpoint {name!r} is not configured (any more)")
        if write and ep.read_only:
            raise ItemError(f"endpoint {ep.name!r} is read-only")
        return ep

    # -- copying one file ------------------------------------------------------------------

    def in_sync(self, src: int, st: os.stat_result, dst_dir: int, name: str) -> bool:
        level = self.request.get("sync_level")
        if level is None:
            return False
        try:
            dst = os.stat(name, dir_fd=dst_dir, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(dst.st_mode):
            return False
        if level == SYNC_EXISTS:
            return True
        if dst.st_size != st.st_size:
            return False
        if level == SYNC_SIZE:
            return True
        if level == SYNC_MTIME:
            return int(dst.st_mtime) >= int(st.st_mtime)
        fd = fs.open_regular(dst_dir, name)
        try:
            same = sha256_fd(src) == sha256_fd(fd)
        finally:
            os.close(fd)
            os.lseek(src, 0, os.SEEK_SET)  # the copy that may follow reads from the start
        self.add("bytes_checksummed", 2 * st.st_size)
        return same

    def copy_data(self, src: int, dst: int, size: int) -> None:
        if size < LARGE or not hasattr(os, "copy_file_range"):
            copied = copy_fd(src, dst, size)
            self.throttle(copied)
        else:
            copied = copy_flushing(src, dst, size, self.after_step)
            self.add("bytes_transferred", -copied)  # counted again once the file is done
        if copied != size:
            raise ItemError("the source is shorter than it was (changed while copying)")

    def after_step(self, got: int) -> None:
        """Between the steps of a large file: progress moves, the rate limit, a stop."""
        self.add("bytes_transferred", got)
        self.throttle(got)
        self.check()
        self.save()

    def copy_file(
        self,
        src_dir: int,
        src_name: str,
        dst_dir: int,
        dst_name: str,
        record: str,
        *,
        listed: bool = False,
        fresh: bool = False,
    ) -> None:
        """Copy one regular file to dst_dir/dst_name (a copy named later, by commit).

        listed: a listing of src_dir has just shown src_name as a regular file. fresh:
        this run created dst_dir, so nothing there can be in sync (no lstat to ask)."""
        try:
            src, st = fs.open_regular_stat(src_dir, src_name, listed=listed)
        except OSError as e:
            self.add("files")
            raise ItemError(f"{record}: cannot be read ({e.strerror or e})") from None
        copy: Pending | None = None
        skipped = False
        try:
            skipped = not fresh and self.in_sync(src, st, dst_dir, dst_name)
            if not skipped:
                copy = self.copy_open(src, st, dst_dir, dst_name, record)
        finally:
            os.close(src)
            with self.lock:  # one hold for a file's counters and its copy: every file takes it
                self.counters["files"] += 1
                self.counters["files_skipped"] += skipped
                if copy is not None:
                    self.pending.append(copy)
                    self.counters["bytes_transferred"] += st.st_size
        if copy is not None:
            self.save()  # at most every SAVE_EVERY: clients watch the counters move

    def copy_open(
        self, src: int, st: os.stat_result, dst_dir: int, dst_name: str, record: str
    ) -> Pending:
        """A complete, not yet named copy of the open file src for dst_dir/dst_name."""
        p = self.create(dst_dir, dst_name, record, stat.S_IMODE(st.st_mode) & 0o777)
        try:
            self.fill(src, p.fd, st)
        except BaseException:
            p.discard()
            raise
        p.flushed = st.st_size >= LARGE
        if p.tmp:
            os.close(p.fd)
            p.fd = -1
        return p

    def create(self, dst_dir: int, name: str, record: str, mode: int) -> Pending:
        """An empty copy for dst_dir/name: unnamed where the file system allows, else hidden."""
        if self.unnamed is None:
            with self.lock:
                if self.unnamed is None:
                    # BATCHINGEST_TRANSFER_UNNAMED=0 forces hidden named copies
                    allowed = env_bool("BATCHINGEST_TRANSFER_UNNAMED", True)
                    probe = f"{self.temp_prefix}probe-{os.getpid()}.tmp"
                    found = fs.probe_unnamed(dst_dir, probe) if allowed else None
                    self.unnamed = found or ""
        if self.unnamed:
            try:
                fd = fs.open_unnamed(dst_dir, mode)
                return Pending(dst_dir, "", name, record, fd)
            except OSError:
                pass  # another file system mounted below: the named way
        tmp = f"{self.temp_prefix}{os.getpid()}-{next(self.temp_ids)}.tmp"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return Pending(dst_dir, tmp, name, record, os.open(tmp, flags, mode, dir_fd=dst_dir))

    def fill(self, src: int, out: int, st: os.stat_result) -> None:
        self.copy_data(src, out, st.st_size)
        after = os.fstat(src)
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            raise ItemError("the source changed while it was copied")
        if self.verify:
            a, b = sha256_fd(src), sha256_fd(out)
            self.add("bytes_checksummed", 2 * st.st_size)
            if a != b:
                raise ItemError(f"checksum mismatch: source {a}, copy {b}")
        if self.preserve:
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        if st.st_size >= LARGE:
            os.fsync(out)

    def commit(self) -> None:
        """Flush the waiting copies with one syncfs, then give them their names, then
        flush the folders holding the names."""
        with self.lock:
            pending, self.pending = self.pending, []
        if not pending:
            return
        try:
            # a large copy alone (fsync-ed already) needs no syncfs, which would wait for
            # everything else written to the file system too
            unflushed = [p for p in pending if not p.flushed]
            if unflushed and not syncfs_group(len(unflushed), unflushed[0].dir_fd):
                for p in unflushed:
                    _fsync(p)
        except BaseException:
            for p in pending:
                p.discard()
            raise
        named: set[int] = set()
        done = 0
        for p in pending:
            try:
                self.name(p)
            except OSError as e:
                self.fail(f"{p.record}: cannot be put in place ({e.strerror})")
                continue
            finally:
                p.discard()
            named.add(p.dir_fd)
            self.done_lines.append(p.record)
            done += 1
        self.add("files_transferred", done)
        for dir_fd in named:
            os.fsync(dir_fd)
        self.flush_done()

    def name(self, p: Pending) -> None:
        """Give a flushed copy its real name, replacing an older file in one rename."""
        if not p.tmp:
            try:
                fs.link_fd(p.fd, p.name, self.unnamed or "proc", dir_fd=p.dir_fd)
                return
            except FileExistsError:
                p.tmp = f"{self.temp_prefix}{os.getpid()}-{next(self.temp_ids)}.tmp"
                fs.link_fd(p.fd, p.tmp, self.unnamed or "proc", dir_fd=p.dir_fd)
        os.replace(p.tmp, p.name, src_dir_fd=p.dir_fd, dst_dir_fd=p.dir_fd)
        p.tmp = ""

    def flush_done(self) -> None:
        if self.done_lines:
            fs.append(self.job_fd, transfers.TRANSFERRED, "".join(self.done_lines).encode())
            self.done_lines = []
        self.save()

    def fail(self, message: str) -> None:
        self.errors.append(message)
        print(f"ERROR {message}", flush=True)


def _fsync(p: Pending) -> None:
    if p.fd >= 0:
        os.fsync(p.fd)
        return
    fd = os.open(p.tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=p.dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_text(text: str) -> str:
    """text as a JSON string, as json.dumps writes it: most paths need no escape, and
    checking that costs a fifth of the encoder's call (a line is made for every file)."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return json.dumps(text)


def record(src: str, dst: str) -> str:
    """The TRANSFERRED line of one file: json.dumps of {source_path, destination_path}."""
    return f'{{"source_path": {json_text(src)}, "destination_path": {json_text(dst)}}}\n'


def _open_parent(run: Run, root: int, parts: list[str]) -> int:
    """The destination's parent folder, created where missing (Globus does)."""
    try:
        return fs.make_dirs(root, parts[:-1])
    except OSError as e:
        raise ItemError(f"cannot create the destination folder: {e.strerror or e}") from None


def transfer_item(run: Run, item: dict[str, Any], dirs: list[int]) -> None:
    """One transfer item: a file, or a folder copied recursively."""
    src_ep = run.endpoint(run.request["source_endpoint"], write=False)
    dst_ep = run.endpoint(run.request["destination_endpoint"], write=True)
    try:
        src_parts = split_path(item["source_path"])
        dst_parts = split_path(item["destination_path"])
    except PathError as e:
        raise ItemError(e.message) from None
    src_root, dst_root = fs.open_root(src_ep.path), fs.open_root(dst_ep.path)
    dirs += [src_root, dst_root]
    src_show, dst_show = item["source_path"], item["destination_path"]
    if not item.get("recursive"):
        if not src_parts or not dst_parts:
            raise ItemError("a file transfer needs a file path on both sides, not '/'")
        above = "/".join(src_parts[:-1])
        src_dir = fs.open_dir(src_root, above) if above else os.dup(src_root)
        dirs.append(src_dir)
        dst_dir = _open_parent(run, dst_root, dst_parts)
        dirs.append(dst_dir)
        run.remove_leftovers(dst_dir)
        run.copy_file(src_dir, src_parts[-1], dst_dir, dst_parts[-1], record(src_show, dst_show))
        return
    try:
        top = os.dup(src_root) if not src_parts else fs.open_dir(src_root, "/".join(src_parts))
    except OSError as e:
        raise ItemError(f"{src_show}: not a folder that can be read ({e.strerror or e})") from None
    dirs.append(top)
    made: list[str] = []
    try:
        dst_top = fs.make_dirs(dst_root, dst_parts, made)
    except OSError as e:
        raise ItemError(f"{dst_show}: cannot create the folder ({e.strerror or e})") from None
    dirs.append(dst_top)
    shown = (src_show.rstrip("/"), dst_show.rstrip("/"))
    walk(run, top, dst_top, shown, dirs, fresh=bool(made))


def walk(
    run: Run, src: int, dst: int, show: tuple[str, str], dirs: list[int], *, fresh: bool
) -> None:
    """Copy the folder src into dst, folder by folder (a loop, not a recursion).

    Folders waiting their turn are kept as paths below src and dst, opened beneath them
    when their turn comes (no link on the way), so a wide tree holds few descriptors;
    finished folders stay open only until their copies are named. fresh: dst was
    created by this run (and so every folder made below it).
    """
    stack: list[list[str]] = [[]]
    done: list[int] = []
    try:
        while stack:
            parts = stack.pop()
            rel = "/".join(parts)
            made: list[str] = []
            try:
                s = fs.open_dir(src, rel) if parts else os.dup(src)
                done.append(s)
                d = fs.make_dirs(dst, parts, made)
                done.append(d)
            except OSError as e:
                run.fail(f"{show[0]}/{rel}: {e.strerror or e}")
                continue
            shown = (f"{show[0]}/{rel}".rstrip("/"), f"{show[1]}/{rel}".rstrip("/"))
            fresh_here = fresh or bool(made)  # made: the folder (and any above it) is new
            stack.extend(reversed(walk_folder(run, s, d, shown, parts, fresh_here)))
            if len(done) > 128 or len(run.pending) >= run.group:
                run.commit()
                while done:
                    os.close(done.pop())
    finally:
        # copies made so far get their names (also when stopped) while their folders
        # are still open
        with contextlib.suppress(OSError):
            run.commit()
        for fd in done:
            os.close(fd)


def walk_folder(
    run: Run, s: int, d: int, shown: tuple[str, str], parts: list[str], fresh: bool
) -> list[list[str]]:
    """Copy the files of one folder; return its subfolders (as paths below the top).

    fresh: this run created d, so it holds neither leftovers of an earlier run nor
    files that could be in sync."""
    run.add("directories")
    if not fresh:
        run.remove_leftovers(d)
    seen: set[str] = set()
    subfolders: list[list[str]] = []
    files: list[str] = []
    for name, kind in sorted(fs.kinds(s, hidden=True)):
        seen.add(name)
        if stat.S_ISDIR(kind):
            subfolders.append([*parts, name])
        elif stat.S_ISREG(kind):
            files.append(name)
        else:
            print(
                f"skipped {shown[0]}/{name}: a {fs.kind(kind)} is never followed or copied",
                flush=True,
            )
    copy_files(run, s, d, shown, files, fresh)
    if run.request.get("delete_destination_extra"):
        remove_extra(run, d, shown[1], seen)
    return subfolders


def copy_files(
    run: Run, s: int, d: int, shown: tuple[str, str], names: list[str], fresh: bool
) -> None:
    """Copy the files names of folder s into d on PARALLEL threads (as the stage task does:
    one thread leaves the disk and the kernel's copy idle between system calls).

    A thread is handed up to PIECE files at a time: handing over one costs a call, a
    queue and a wake-up (about 7 µs of CPU a file, against under 1 µs handed over 16 at a
    time); a short list is split evenly, so two big files still go on two threads.
    """

    def some(piece: list[str]) -> None:
        for name in piece:
            run.check()
            try:
                shown_pair = record(f"{shown[0]}/{name}", f"{shown[1]}/{name}")
                run.copy_file(s, name, d, name, shown_pair, listed=True, fresh=fresh)
            except ItemError as e:
                run.fail(str(e))

    for start in range(0, len(names), CHUNK):
        chunk = names[start : start + CHUNK]
        piece = max(1, min(PIECE, -(-len(chunk) // PARALLEL)))
        # every copy is done with s and d before anyone closes them; then Stop, or a
        # failure of the destination, is raised here, in order
        run.workers.run_all([functools.partial(some, chunk[i : i + piece])
                             for i in range(0, len(chunk), piece)])  # fmt: skip
        if len(run.pending) >= run.group:
            run.commit()  # unnamed copies hold a descriptor each until named


def remove_extra(run: Run, dst: int, dst_show: str, keep: set[str]) -> None:
    """delete_destination_extra: what the destination folder has and the source has not."""
    for entry in list(fs.entries(dst, hidden=True)):
        if entry.name in keep or entry.name.startswith(SERVICE_PREFIX):
            continue
        try:
            fs.remove(dst, entry.name, recursive=True)
            print(f"deleted {dst_show}/{entry.name}: not in the source", flush=True)
        except OSError as e:
            run.fail(f"{dst_show}/{entry.name}: cannot be deleted ({e.strerror or e})")


def delete_item(run: Run, item: dict[str, Any]) -> None:
    ep = run.endpoint(run.request["endpoint"], write=True)
    try:
        parts = split_path(item["path"])
    except PathError as e:
        raise ItemError(e.message) from None
    if not parts:
        raise ItemError("/ is the endpoint folder itself: it is never deleted")
    if any(p.startswith(SERVICE_PREFIX) for p in parts):
        raise ItemError(f"{item['path']}: names starting with {SERVICE_PREFIX} are the service's")
    root = fs.open_root(ep.path)
    try:
        st = fs.lstat(root, "/".join(parts))
        if st is None:
            if run.request.get("ignore_missing"):
                return
            raise ItemError(f"{item['path']}: no such file or folder")
        if stat.S_ISDIR(st.st_mode) and not run.request.get("recursive"):
            raise ItemError(f"{item['path']} is a folder: a delete of folders needs recursive")
        fs.remove(root, "/".join(parts), recursive=True)
        run.add("files" if not stat.S_ISDIR(st.st_mode) else "directories")
        print(f"deleted {item['path']}", flush=True)
    except OSError as e:
        raise ItemError(f"{item['path']}: cannot be deleted ({e.strerror or e})") from None
    finally:
        os.close(root)


def run_items(run: Run) -> None:
    items = run.request.get("items") or []
    run.counters["subtasks_total"] = len(items)
    for item in items:
        run.check(now=True)
        before = len(run.errors)
        dirs: list[int] = []
        try:
            if run.request["kind"] == "delete":
                delete_item(run, item)
            else:
                transfer_item(run, item, dirs)
        except ItemError as e:
            run.fail(str(e))
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise
            shown = item.get("path") or item.get("source_path")
            run.fail(f"{shown}: {e.strerror or e}")
        finally:
            with contextlib.suppress(OSError):
                run.commit()  # copies made before a failure still get their names
            for fd in dirs:
                os.close(fd)
        run.add("subtasks_succeeded" if len(run.errors) == before else "subtasks_failed")
        run.save()


def staccato(run: Run) -> None:
    """A byte range of one file into the same offsets of another, resumable from progress."""
    req = run.request
    src_ep = run.endpoint(req["source_endpoint"], write=False)
    dst_ep = run.endpoint(req["destination_endpoint"], write=True)
    src_parts, dst_parts = req["source_parts"], req["destination_parts"]
    progress = int(transfers.read_progress(run.job_fd).get("progress") or 0)
    src_root, dst_root = fs.open_root(src_ep.path), fs.open_root(dst_ep.path)
    opened = [src_root, dst_root]
    try:
        src = fs.open_regular(src_root, "/".join(src_parts))
        opened.append(src)
        parent = fs.make_dirs(dst_root, dst_parts[:-1])
        opened.append(parent)
        dst = fs.open_regular(parent, dst_parts[-1], os.O_WRONLY | os.O_CREAT, 0o644)
        opened.append(dst)
        size = os.fstat(src).st_size
        start, end = int(req["start_offset"]), int(req["end_offset"])
        end = size if end < 0 or end > size else end
        run.counters["progress"] = progress
        pos = start + progress
        if progress:
            print(f"transfer: resuming at offset {pos} ({progress} bytes already written)")
        while pos < end:
            run.check()
            n = min(STEP, end - pos)
            got = _copy_at(src, dst, pos, n)
            if got == 0:
                raise ItemError(f"the source ended at {pos}, before {end}")
            os.fsync(dst)  # progress counts only bytes on disk
            pos += got
            run.counters["progress"] += got
            run.add("bytes_transferred", got)
            run.save(force=True)
            run.throttle(got)
    finally:
        for fd in reversed(opened):
            os.close(fd)


def _copy_at(src: int, dst: int, pos: int, n: int) -> int:
    try:
        return copy_range(src, dst, pos, n)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    data = os.pread(src, n, pos)
    view, at = memoryview(data), pos
    while view:
        written = os.pwrite(dst, view, at)
        view, at = view[written:], at + written
    return len(data)


def run(job_dir: Path) -> int:
    job_fd = fs.open_root(job_dir)
    request = transfers.read_request(job_fd)
    if not request.get("kind"):
        print("ERROR transfer: no readable TRANSFER.json in this job", flush=True)
        return EXIT_FAILED
    max_rate = int(os.environ.get("BATCHINGEST_TRANSFER_MAX_RATE") or 0)
    r = Run(job_fd, request, load_endpoints(), max_rate)
    if not r.rerun:
        # there before the first copy: a run cut off from here on is known as one by the
        # next (Run.rerun), which then sweeps its unfinished copies
        r.save()
    print(
        f"transfer: {request['kind']} {request.get('id')} started at "
        f"{datetime.now(UTC).isoformat(timespec='seconds')}",
        flush=True,
    )
    try:
        r.check(now=True)
        if request["kind"] == "staccato":
            staccato(r)
        else:
            run_items(r)
    except Stop as e:
        with contextlib.suppress(OSError):
            r.commit()
        print(f"transfer: stopped: {e.description}", flush=True)
        r.save(force=True, fatal={"code": e.code, "description": e.description})
        return EXIT_STOPPED
    except (ItemError, OSError) as e:
        r.fail(str(e) if isinstance(e, ItemError) else f"{e.strerror or e}")
    finally:
        r.workers.shutdown()
    if r.errors:
        more = f" (and {len(r.errors) - 1} more)" if len(r.errors) > 1 else ""
        r.save(force=True, fatal={"code": "FAILED", "description": r.errors[0] + more})
        return EXIT_FAILED
    r.save(force=True)
    c = r.counters
    print(
        f"transfer: done: {c['files_transferred']} files copied, {c['files_skipped']} "
        f"skipped, {c['bytes_transferred']} bytes",
        flush=True,
    )
    return 0


# Set by SIGTERM, which the processor sends to stop a canceled task (or one past its
# deadline): the copy stops at its next look and saves its progress before it exits.
_TERMINATED = threading.Event()


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: _TERMINATED.set())
    sys.exit(run(Path(os.environ.get("JOBPATH") or os.getcwd())))


if __name__ == "__main__":
    main()
