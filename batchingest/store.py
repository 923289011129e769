"""The jobs root: state folders, job names, atomic moves, listing, holding.

A job is a folder; its state is the folder it sits in. This is the only module that
knows the layout::

    ROOT/data/NAME        status "ready": being assembled
    ROOT/queue/NAME       waiting for a processor
    ROOT/processing/NAME  held by a live processor
    ROOT/success/NAME     finished
    ROOT/error/NAME       stopped at a failed task

Every state change is one rename inside the root, so a crash never leaves a job in two
states or half-moved, and an operator can do everything here with `mv`.

A processor marks a job it holds with an exclusive `flock` on the hidden file `.lock`
inside the job folder, taken *before* the job is renamed into processing/ and kept until
it has been renamed out again. The lock belongs to the open file, so it moves with the
folder, it is dropped by the kernel when the holder dies, and task processes inherit it:
a task orphaned by a killed service keeps the job held until it exits. On Linux NFS
clients flock is carried out as an NFS byte-range lock, so the same holds across
machines sharing one root (a dead client's locks expire with its NFS lease).
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import logging
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from batchingest import fs
from batchingest.fs import rename_noreplace

log = logging.getLogger("batchingest.store")

STATES = ("data", "queue", "processing", "success", "error")
FINAL_STATES = ("success", "error")
# The API and JOB listings speak of statuses; only data/ differs from its folder name.
STATUS_OF_STATE = {
    "data": "ready",
    "queue": "queue",
    "processing": "processing",
    "success": "success",
    "error": "error",
}
STATE_OF_STATUS = {v: k for k, v in STATUS_OF_STATE.items()}

LOCK_FILE = ".lock"
TRASH = ".trash"
_NAME = re.compile(r"[A-Za-z0-9._-]{1,255}")
_MAX_SUFFIX = 99_999


class StoreError(Exception):
    """The jobs root cannot be used."""


class InvalidName(ValueError):
    pass


class JobNotFound(LookupError):
    pass


class JobBusy(Exception):
    """The job is held by a processor (or is being moved) and cannot be changed now."""


def valid_name(name: str) -> bool:
    """Job and task names: 1-255 of [A-Za-z0-9._-], not starting with a dot."""
    return bool(_NAME.fullmatch(name)) and not name.startswith(".")


def check_name(name: str) -> str:
    if not valid_name(name):
        raise InvalidName(
            f"invalid name {name[:300]!r}: use 1-255 characters of A-Z a-z 0-9 . _ -, "
            "not starting with '.'"
        )
    return name


@dataclass(frozen=True)
class Job:
    name: str
    state: str
    path: Path

    @property
    def status(self) -> str:
        return STATUS_OF_STATE[self.state]


@dataclass
class Hold:
    """A job this process holds: the open, flock-ed `.lock` file travels with the folder."""

    name: str
    path: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


T = TypeVar("T")

# A state change listener gets the job in its new state and the state it came from.
Listener = Callable[[Job, str | None], None]


def _lock(path: Path) -> int | None:
    """Open and flock path/.lock without blocking; None if someone else holds it."""
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _is_real_dir(path: str) -> bool:
    """A folder, not a symbolic link to one: a link in a state folder is never a job, or
    the API would serve and write wherever it points."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class Store:
    """The jobs root. Cheap to create; holds no state beyond its path and listeners."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()
        self._listeners: list[Listener] = []
        self._warned: set[str] = set()
        self._state_prefixes = tuple(f"{self.root / state}/" for state in STATES)
        # state -> (folder identity, sorted names): see job_names()
        self._names_cache: dict[str, tuple[tuple[int, int, int, int], list[str]]] = {}
        self._root_fd = -1

    @property
    def root_fd(self) -> int:
        """A descriptor of the root, opened once: job folders are opened beneath it."""
        if self._root_fd < 0:
            self._root_fd = fs.open_root(self.root)
        return self._root_fd

    def open_job(self, job: Job) -> int:
        """A descriptor for the job's folder, opened without following any link.

        Every file of a job is then reached through this descriptor (batchingest.fs), so
        a link planted in the job, or a folder swapped for one, leads nowhere.
        FileNotFoundError if the job has moved on meanwhile.
        """
        return fs.open_dir(self.root_fd, f"{job.state}/{job.name}")

    # -- layout -----------------------------------------------------------------

    def state_dir(self, state: str) -> Path:
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        return self.root / state

    def job_path(self, state: str, name: str) -> Path:
        return self.state_dir(state) / check_name(name)

    def service_path(self, name: str) -> Path:
        """A hidden file or folder of the service in the root (outbox, API token, ...).

        Hidden entries are never jobs, so they are safe from listings and processors.
        """
        return self.root / f".{name}"

    def init(self) -> None:
        """Create missing state folders and clear the trash; raise StoreError if unusable."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for state in STATES:
                self.state_dir(state).mkdir(exist_ok=True)
            probe = self.root / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StoreError(f"jobs root {self.root} is not usable: {e.strerror or e}") from e
        trash = self.root / TRASH
        if trash.is_dir():
            for entry in trash.iterdir():
                shutil.rmtree(entry, ignore_errors=True)

    # -- finding and listing -----------------------------------------------------

    def find(self, name: str) -> Job | None:
        """The job's current state, or None. Checks twice to see through a move in flight.

        On the API's hot path (`GET /jobs/{id}`): plain string paths, one stat per state.
        """
        check_name(name)
        for _ in range(2):
            for state, base in zip(STATES, self._state_prefixes, strict=True):
                if _is_real_dir(base + name):
                    return Job(name, state, Path(base + name))
        return None

    def read(self, name: str, read: Callable[[Job], T]) -> tuple[Job, T] | None:
        """Find a job and read from its folder; None if there is no such job.

        A job can change state between being found and being read (a processor claims
        it, finishes it), and a read from the old path then sees nothing. The answer
        only counts if the folder read from was still in place afterwards; otherwise
        the job is looked up again.
        """
        for _ in range(3):
            job = self.find(name)
            if job is None:
                return None
            value = read(job)
            if _is_real_dir(str(job.path)):
                return job, value
        raise JobBusy(f"job {name!r} keeps changing state")

    def get(self, name: str) -> Job:
        job = self.find(name)
        if job is None:
            raise JobNotFound(f"no job named {name!r}")
        return job

    def _entries(self, state: str) -> Iterator[os.DirEntry[str]]:
        try:
            with os.scandir(self.state_dir(state)) as it:
                for entry in it:
                    if entry.name.startswith("."):
                        continue
                    yield entry
        except FileNotFoundError:
            return

    def job_names(self, state: str) -> builtins.list[str]:
        """Sorted names of the jobs in one state, reused while the folder is unchanged.

        Paging `GET /jobs?limit=100` over 10,000 jobs must not rescan every entry: the
        listing is kept with the folder's (inode, nlink, mtime, ctime) and reused while
        those are the same. A listing is only kept when the folder had not changed for a
        second before the scan began, so two changes within one timestamp tick cannot
        hide behind an unchanged mtime.
        """
        cache = self._names_cache
        path = self.state_dir(state)
        started = time.time_ns()
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return []
        key = (st.st_ino, st.st_nlink, st.st_mtime_ns, st.st_ctime_ns)
        hit = cache.get(state)
        if hit is not None and hit[0] == key:
            return hit[1]
        names = [
            e.name
            for e in self._entries(state)
            if valid_name(e.name) and e.is_dir(follow_symlinks=False)
        ]
        names.sort()  # callers share this list: never change it
        # any entry change sets mtime to now, so an old mtime cannot hide a later one
        if started - st.st_mtime_ns > 1_000_000_000:
            cache[state] = (key, names)
        else:
            cache.pop(state, None)
        return names

    def list(self, states: Iterable[str] | None = None) -> list[Job]:
        """Jobs in the given states (all by default), sorted by name.

        Built from job_names(): directory entries (d_type) only, never a stat per job,
        so listing 10,000 jobs stays cheap.
        """
        jobs: list[Job] = []
        for state in STATES if states is None else states:
            base = self.state_dir(state)
            jobs.extend(Job(name, state, base / name) for name in self.job_names(state))
        jobs.sort(key=lambda j: (j.name, STATES.index(j.state)))
        return jobs

    def queued(self) -> builtins.list[str]:
        """Names of jobs in queue/, oldest first (folder mtime, then name).

        Anything in queue/ that is not a job (a stray file, a bad name) is logged once
        and skipped.
        """
        found: list[tuple[float, str]] = []
        for entry in self._entries("queue"):
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
                mtime = entry.stat().st_mtime if is_dir else 0.0
            except FileNotFoundError:
                continue  # claimed by someone else meanwhile
            if not is_dir or not valid_name(entry.name):
                if entry.name not in self._warned:
                    self._warned.add(entry.name)
                    what = "not a folder" if not is_dir else "not a valid job name"
                    log.warning("skipping %r in queue/: %s", entry.name, what)
                continue
            found.append((mtime, entry.name))
        found.sort()
        return [name for _, name in found]

    # -- moving --------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call listener(job, old_state) after every move this store makes.

        Listeners run in the thread that made the move, one after another, and *before
        the move returns*: whatever a listener records (the webhook outbox) is done by
        the time the caller reports the move. So a listener must be quick, and must not
        wait on the event loop (a move may be made on it). One that raises is logged and
        does not undo the move or stop the others. Returns a function that unsubscribes.
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _notify(self, job: Job, old_state: str | None) -> None:
        for listener in list(self._listeners):
            try:
                listener(job, old_state)
            except Exception:
                log.exception("state change listener failed for %s", job.name)

    def _final_target(self, name: str) -> Iterator[str]:
        yield name
        for i in range(1, _MAX_SUFFIX + 1):
            suffix = f"-{i:03d}"
            # a long name is shortened so NAME-NNN stays a valid name (and a legal file name)
            yield name[: 255 - len(suffix)] + suffix

    def _move(self, name: str, src: str, dst: str) -> Job:
        """Rename src/NAME to dst/NAME; in a final state take the first free NAME-NNN."""
        source = self.job_path(src, name)
        for target_name in self._final_target(name) if dst in FINAL_STATES else [name]:
            target = self.state_dir(dst) / target_name
            try:
                rename_noreplace(str(source), str(target))
            except FileExistsError:
                continue
            except OSError as e:
                if e.errno == errno.ENOTEMPTY:
                    continue
                raise
            job = Job(target_name, dst, target)
            self._notify(job, src)
            return job
        if dst in FINAL_STATES:
            raise StoreError(f"no free name left for {name} in {dst}/")
        raise FileExistsError(errno.EEXIST, f"{dst}/{name} exists")

    def move(self, name: str, src: str, dst: str) -> Job:
        """Move a job between states. FileNotFoundError if it is not in src.

        Moving into queue/ or data/ where a job of that name already sits fails with
        FileExistsError: nothing is ever overwritten.
        """
        try:
            return self._move(name, src, dst)
        except FileNotFoundError:
            raise JobNotFound(f"no job {name!r} in {src}/") from None

    def create(self, name: str) -> tuple[Job, bool]:
        """Create an empty job in data/; if the name exists in any state, return that."""
        existing = self.find(name)
        if existing is not None:
            return existing, False
        path = self.job_path("data", name)
        try:
            path.mkdir()
        except FileExistsError:
            return Job(name, "data", path), False
        return Job(name, "data", path), True

    def queue(self, name: str) -> tuple[Job, bool]:
        """Move a job from data/, error/ or success/ to queue/.

        Returns (job, moved); a job already in queue/ or processing/ is left alone.
        """
        for _ in range(3):
            job = self.get(name)
            if job.state in ("queue", "processing"):
                return job, False
            try:
                return self._move(name, job.state, "queue"), True
            except FileNotFoundError:
                continue  # it moved meanwhile: look again
            except FileExistsError:
                # the same name already waits in queue/: report that one
                return self.get(name), False
        raise JobBusy(f"job {name!r} keeps changing state")

    # -- holding (processors) -----------------------------------------------------

    def claim(self, name: str) -> Hold | None:
        """Take a queued job into processing/; None if another processor got it first."""
        src = self.job_path("queue", name)
        fd = _lock(src)
        if fd is None:
            return None
        if not _same_file(fd, src / LOCK_FILE):
            os.close(fd)  # the folder we locked has moved on meanwhile
            return None
        try:
            self._move(name, "queue", "processing")
        except (FileNotFoundError, FileExistsError, OSError):
            os.close(fd)
            return None
        return Hold(name, self.job_path("processing", name), fd)

    def finish(self, hold: Hold, state: str) -> Job:
        """Move a held job out of processing/ and release it."""
        try:
            return self._move(hold.name, "processing", state)
        finally:
            hold.release()

    def recover(self) -> builtins.list[str]:
        """Return jobs in processing/ that no live process holds to queue/.

        A job is only taken back while its lock is ours, so a job run by a live processor
        (here or on another machine), or still held by an orphaned task, is left alone.
        """
        recovered: builtins.list[str] = []
        for entry in self._entries("processing"):
            if not valid_name(entry.name):
                continue
            path = Path(entry.path)
            fd = _lock(path)
            if fd is None:
                continue
            try:
                # the folder we locked must still be the one at processing/NAME
                if not _same_file(fd, path / LOCK_FILE):
                    continue
                try:
                    self._move(entry.name, "processing", "queue")
                except (FileNotFoundError, FileExistsError):
                    continue
                recovered.append(entry.name)
                log.warning("recovered %s: back to queue/ (its processor is gone)", entry.name)
            finally:
                os.close(fd)
        return recovered

    # -- deleting ------------------------------------------------------------------

    def delete(self, name: str) -> bool:
        """Remove a job and all its files. False if there was none; JobBusy if held.

        The job is first renamed into the hidden trash folder, so no listing shows and
        no processor claims a half-deleted job.
        """
        trash = self.root / TRASH
        trash.mkdir(exist_ok=True)
        for _ in range(3):
            job = self.find(name)
            if job is None:
                return False
            if job.state == "processing":
                raise JobBusy(f"job {name!r} is being processed")
            fd = _lock(job.path)
            if fd is None:
                if not job.path.exists():
                    continue
                raise JobBusy(f"job {name!r} is held by a processor")
            try:
                # shortened: NAME plus the suffix must stay a legal file name
                target = trash / f"{name[:200]}.{uuid.uuid4().hex}"
                try:
                    os.rename(job.path, target)
                except FileNotFoundError:
                    continue
            finally:
                os.close(fd)
            shutil.rmtree(target, ignore_errors=True)
            return True
        raise JobBusy(f"job {name!r} keeps changing state")

    # -- for the HTTP API --------------------------------------------------------------

    def hold_unqueued(self, name: str, wait: float = 5.0) -> Hold | None:
        """Hold a job that is in data/, success/ or error/ while its files are changed.

        With the job's lock taken no processor can claim it and nobody can delete it,
        so an upload renamed into place under the hold is complete before any task
        sees the job, even if it is queued meanwhile. Another holder of an unqueued job
        is another upload committing or a delete, both brief, so we wait up to `wait`
        seconds for it. None if the job is queued, processing or still held after that;
        JobNotFound if there is none.
        """
        deadline = time.monotonic() + wait
        moves = 0
        while moves < 3:
            job = self.get(name)
            if job.state in ("queue", "processing"):
                return None
            fd = _lock(job.path)
            if fd is None:
                if not job.path.exists():
                    moves += 1  # moved meanwhile: look again
                elif time.monotonic() >= deadline:
                    return None
                else:
                    time.sleep(0.002)
                continue
            now = self.find(name)
            if (
                now is not None
                and now.state not in ("queue", "processing")
                and _same_file(fd, now.path / LOCK_FILE)
            ):
                return Hold(name, now.path, fd)
            os.close(fd)
            if now is not None and now.state in ("queue", "processing"):
                return None
            moves += 1
        raise JobBusy(f"job {name!r} keeps changing state")
