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

A processor marks a job it holds with an exclusive `flock`, taken *before* the job is
renamed into processing/ and kept until it has been renamed out again. The lock belongs
to the open file, so it moves with the folder, it is dropped by the kernel when the
holder dies, and task processes inherit it: a task orphaned by a killed service keeps
the job held until it exits. Where the root is on a local file system the lock is taken
on the job folder's own descriptor (Store.folder_locks): nothing is created or removed
for it. On a shared one it is taken on the hidden file `.lock` inside the job folder,
since NFS carries flock out as a byte-range lock, which needs a file open for writing;
so the same holds across machines sharing one root (a dead client's locks expire with
its NFS lease).

Where locks are not shared between machines, a holder's lock is invisible to the
others, so holding also takes a lease (batchingest.lease): the hidden `.lease` in the job
folder, made before the claim's rename, renewed by the holder, taken over by another
host only once it has expired by the shared file system's clock. Recovery on the
holder's own machine stays immediate (its lock is free and its pid gone). A local file
system has no other machine to tell, so a claim there makes no lease (Store.leases;
--shared-root for a local root that other machines mount too); recovery still respects
a live lease it finds.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import functools
import itertools
import logging
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from batchingest import fs, lease, listings
from batchingest.fs import rename_noreplace

log = logging.getLogger("batchingest.store")


class State(StrEnum):
    """A job's state: the folder it sits in. Members are strings ("queue" == State.QUEUE)."""

    DATA = "data"
    QUEUE = "queue"
    PROCESSING = "processing"
    SUCCESS = "success"
    ERROR = "error"

    @property
    def status(self) -> str:
        """The word the API and JOB listings use; only data/ differs: "ready"."""
        return "ready" if self is State.DATA else self.value


# Waiting for or held by a processor: its files must not change, it cannot be deleted.
BUSY = frozenset({State.QUEUE, State.PROCESSING})
FINAL = frozenset({State.SUCCESS, State.ERROR})

# The older names, kept for the modules that use them.
STATES: tuple[str, ...] = tuple(State)
FINAL_STATES: tuple[str, ...] = (State.SUCCESS, State.ERROR)
STATUS_OF_STATE: dict[str, str] = {state: state.status for state in State}
STATE_OF_STATUS: dict[str, State] = {state.status: state for state in State}


def parse_statuses(text: str | None) -> list[State]:
    """The states a comma-separated list of status words (or folder names) names, in order.

    None means every state. ValueError names a word that is neither; the API and the
    command line both read `?status=` / `--status` this way.
    """
    if text is None:
        return list(State)
    states: list[State] = []
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        state = STATE_OF_STATUS.get(word) or (State(word) if word in STATES else None)
        if state is None:
            known = ", ".join(STATUS_OF_STATE.values())
            raise ValueError(f"unknown status {word!r} (use {known})")
        if state not in states:
            states.append(state)
    return states


LOCK_FILE = ".lock"
# What this process runs short of (descriptors, memory), never a fault of the job: such
# an OSError is raised as it is, for the caller to say so and try again later.
SHORTAGE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# A request to cancel the job (batchingest.control): inside the job folder, so it moves
# with the job and outlives a restart of whoever holds it.
CANCEL_FILE = ".cancel"
TRASH = ".trash"
# The root-wide feed of job events (batchingest.events.Feed): hourly files in this folder
FEED = ".events"
_NAME = re.compile(r"[A-Za-z0-9._-]{1,255}")
# valid_name() for many names at once, each followed by a newline
_NAMES = re.compile(r"(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}\n)*")
_MAX_SUFFIX = 99_999
# Hidden temporaries of fs.write_atomic (`.NAME.<12 hex>.tmp`) and of its predecessor
# (tempfile's `.NAME.<8 random>.tmp`): a crash between create and rename leaves one.
_TEMP = re.compile(r"\..+\.[A-Za-z0-9_]{8,12}\.tmp")
# A temporary this old cannot belong to a write still going on (they take milliseconds),
# even one by another service sharing the root.
SWEEP_AGE = 60.0
# Seconds after a service starts at which its job folders are swept (sweep_jobs): the
# first listing of queue/ and the first claims should not share the interpreter with it.
SWEEP_AFTER = 3.0
# A state folder with this many entries or more is watched (batchingest.listings) rather
# than listed again whenever it changes; below it a listing costs under 2 ms.
WATCH_FROM = 2_000


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


def _lock_taken(dir_fd: int, folder: bool = False) -> bool | None:
    """Does a process hold the job (its folder's lock, or else its `.lock`)? None if
    `.lock` is a link or a special file. With folder locks a `.lock` file held by an
    earlier version's holder counts too (_old_lock_held)."""
    if folder:
        if not _lock_dir(dir_fd):
            return True
        fcntl.flock(dir_fd, fcntl.LOCK_UN)
        return _old_lock_held(dir_fd)
    return _lock_file_taken(dir_fd, fcntl.LOCK_EX)


def _lock_file_taken(dir_fd: int, how: int) -> bool | None:
    """Does a process hold the job folder's `.lock` file (tried with the flock `how`,
    without waiting)? False if there is none (a holder makes it before it claims); None
    if it is a link or a special file (planted: no processor would lock that) or cannot
    be locked."""
    try:
        fd = fs.open_regular(dir_fd, LOCK_FILE)
    except FileNotFoundError:
        return False
    except (fs.UnsafePath, fs.NotRegular):
        return None
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        return None
    finally:
        os.close(fd)  # closing drops the flock we may have taken
    return False


def _old_lock_held(dir_fd: int) -> bool:
    """Whether a process holds the job folder's `.lock` file, where holds are folder locks.

    Versions before folder locks held every job by a flock on `.lock`; a task such a
    service left running when it was killed with -9 holds its job that way still, and
    must not see it requeued beside it. Only a regular file already there is opened
    (never made, never through a link): a link, folder or FIFO of that name is the
    job's content and holds nothing. A shared lock is enough to see an exclusive one.
    """
    try:
        return _lock_file_taken(dir_fd, fcntl.LOCK_SH) is True
    except OSError as e:
        if e.errno in SHORTAGE:
            raise
        return False  # cannot be opened: not a lock file anyone holds


def _lock_dir(dir_fd: int) -> bool:
    """flock the job folder itself without blocking: False if another holds it.

    The lock belongs to dir_fd's open file, so it follows the folder through renames
    and is inherited by the tasks, as a `.lock` file's is.
    """
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        if e.errno in SHORTAGE:
            raise
        raise LockUnusable(e.errno or 0, f"its folder cannot be locked ({e.strerror})") from e
    return True


@dataclass(frozen=True)
class Looks:
    """How leases are judged in one look at processing/ (see Store.stuck)."""

    me: lease.Owner
    now: Callable[[], float]
    timeout: float


class _LookingClock(lease.Clock):
    """The shared file system's clock, or this machine's where the root cannot be
    written (an operator looking with fewer rights than the service has)."""

    def __call__(self) -> float:
        try:
            return super().__call__()
        except OSError:
            return time.time()


@dataclass(frozen=True)
class Job:
    name: str
    state: State
    path: Path

    @property
    def status(self) -> str:
        return State(self.state).status


class LockUnusable(OSError):
    """The job's `.lock` is a folder, a link, a special file or not writable (or the
    folder cannot be opened): the job cannot be held, so it is skipped (and said so
    once in the service log). Never raised for a shortage of this process's own
    (SHORTAGE: out of descriptors): that is no reason to touch the job."""


@dataclass
class Hold:
    """A job this process holds: the open, flock-ed `.lock` file travels with the folder.

    dir_fd is the job folder itself, which follows it through renames too. Where the
    folder itself is flock-ed (Store.folder_locks) there is no `.lock`: fd is -1.
    """

    name: str
    path: Path
    fd: int
    dir_fd: int = -1
    lease: lease.Held | None = None
    # the folder's change time when it was taken: a claim's is when the job entered
    # queue/ (the rename sets it), for the pickup latency
    ctime: float | None = None

    @property
    def lock_fd(self) -> int:
        """The descriptor whose open file carries the lock (tasks inherit it)."""
        return self.fd if self.fd >= 0 else self.dir_fd

    def owned(self) -> bool:
        """Whether the job is still ours to change: our lease is still in place."""
        return self.lease is None or (self.dir_fd >= 0 and self.lease.is_ours(self.dir_fd))

    def abandon(self) -> None:
        """Let go without removing anything: the job (and its `.lock`) may be another's."""
        if self.lease is not None:
            self.lease.close()
        for fd in (self.dir_fd, self.fd):
            if fd >= 0:
                os.close(fd)
        self.dir_fd = self.fd = -1

    def release(self) -> None:
        """Remove `.lock` (if it is still ours) and drop the lock (a folder's lock goes
        with the folder's descriptor: nothing to remove).

        The name goes while the lock is still held: anyone who opened the old file
        finds, once they get the lock, that `.lock` is no longer it and backs off (they
        all check), so a finished job carries no `.lock` and nobody ever holds a stale one.
        """
        if self.lease is not None:
            self.lease.drop(self.dir_fd)
        if self.dir_fd >= 0:
            with contextlib.suppress(OSError):
                if self.fd >= 0 and _is_our_lock(self.dir_fd, self.fd):
                    os.unlink(LOCK_FILE, dir_fd=self.dir_fd)
            os.close(self.dir_fd)
            self.dir_fd = -1
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


T = TypeVar("T")

# A state change listener gets the job in its new state and the state it came from.
Listener = Callable[[Job, str | None], None]


def _is_our_lock(dir_fd: int, lock_fd: int) -> bool:
    """Whether `.lock` in the folder dir_fd is still the file lock_fd has open."""
    try:
        return fs.same_inode(
            os.fstat(lock_fd), os.stat(LOCK_FILE, dir_fd=dir_fd, follow_symlinks=False)
        )
    except OSError:
        return False


def _lock_at(dir_fd: int) -> int | None:
    """Open and flock `.lock` in the job folder dir_fd without blocking.

    None if someone else holds it or the folder is gone; LockUnusable if `.lock` is
    something we must not or cannot open (a link, a folder, a FIFO, read-only).
    """
    try:
        fd = fs.open_regular(dir_fd, LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        return None  # the folder was removed (a delete) after we opened it
    except OSError as e:
        if e.errno in SHORTAGE:
            raise  # nothing is wrong with the job: the caller tries again later
        st = fs.lstat(dir_fd, LOCK_FILE)
        what = f"is a {fs.kind(st.st_mode)}" if st else "cannot be opened"
        if st is not None and stat.S_ISREG(st.st_mode):
            what = f"cannot be opened ({e.strerror})"
        raise LockUnusable(errno.EINVAL, f"its {LOCK_FILE} {what}") from None
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


class Store:
    """The jobs root. Cheap to create; holds no state beyond its path and listeners."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()
        self._listeners: list[Listener] = []
        # the folder a claim in this thread is moving (see moving_folder)
        self._moving = threading.local()
        self._warned: set[str] = set()
        self._state_prefixes = tuple(f"{self.root / state}/" for state in STATES)
        self._state_rels = tuple((state, f"{state}/") for state in State)  # open_state()
        self._state_dirs = {str(state): self.root / state for state in STATES}
        # state -> (folder identity, sorted names): see job_names()
        self._names_cache: dict[str, tuple[tuple[int, int, int, int], list[str]]] = {}
        self._count_cache: dict[str, tuple[tuple[int, int, int, int], int]] = {}  # job_count()
        # the state folders' names kept by inotify once one is large (see _from_watch)
        self.watch_from = WATCH_FROM
        self._watched: listings.Watched | None = None
        self._watch_lock = threading.Lock()
        self._watch_given_up = False
        self._root_fd = -1
        self._lock_warned: set[str] = set()
        # who holds jobs here, and after how long another host may take a lease over
        self.owner = lease.Owner.here()
        self.lease_timeout = lease.DEFAULT_TIMEOUT
        # set in an extra API process (batchingest.apiprocs): its moves are made by the
        # main process, whose listeners order them against the processor's claims
        self.mover: Callable[[str, str, str], Job] | None = None
        # hold a job by a flock on its folder rather than on a `.lock` file in it; None:
        # where the root is on a local file system (see local)
        self.folder_locks: bool | None = None
        # give a claimed job a lease (`.lease`); None: unless the root is local (no other
        # host can see it), True for a local root exported to others (--shared-root)
        self.leases: bool | None = None

    @functools.cached_property
    def shared_fs(self) -> str | None:
        """The file system of the root if other machines may share it (lease.shared_fs,
        read once): then queue/ is polled, listings are scanned, leases are opened."""
        return lease.shared_fs(self.root)

    @property
    def local(self) -> bool:
        """Whether the root is on a file system of this machine alone (not shared_fs).

        There every holder is a process of this machine, so the folder's own flock
        tells them all; a shared file system may carry flock out as a byte-range lock
        (NFS), which needs a file open for writing: `.lock`.
        """
        return self.shared_fs is None

    def _folder_locking(self) -> bool:
        return self.local if self.folder_locks is None else self.folder_locks

    @property
    def uses_leases(self) -> bool:
        """Whether claims here take leases (a shared root)."""
        return not self.local if self.leases is None else self.leases

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

    def open_state_dir(self, state: str) -> int:
        """A descriptor for one state folder: its jobs opened beneath it by name alone,
        without building a path for each (a pass over 10,000 queued jobs)."""
        self.state_dir(state)  # ValueError for an unknown state
        return fs.open_dir(self.root_fd, state)

    def open_named(self, name: str) -> tuple[Job, int] | None:
        """The job of that name and a descriptor of its folder; None if there is none.

        One open per state folder tried (no lookup first, then an open): the hot path of
        `GET /jobs/{id}`. What is read through the descriptor is the job's, even if it
        moves on meanwhile. Looks twice, as find() does, to see through a move in flight.
        """
        found = self.open_state(name)
        if found is None:
            return None
        state, fd = found
        return Job(name, state, self.job_path(state, name)), fd

    def open_state(self, name: str) -> tuple[State, int] | None:
        """open_named without the Job: the state the job was found in and its folder's
        descriptor (no Path built: on `GET /jobs/{id}` that costs as much as an open)."""
        check_name(name)
        for _ in range(2):
            for state, rel in self._state_rels:
                try:
                    fd = fs.open_dir(self.root_fd, rel + name)
                except (FileNotFoundError, NotADirectoryError, fs.UnsafePath):
                    continue  # not there, or a link or a file: never a job
                return state, fd
        return None

    # -- layout -----------------------------------------------------------------

    def state_dir(self, state: str) -> Path:
        try:
            return self._state_dirs[state]  # made once: a job's every move asks
        except KeyError:
            raise ValueError(f"unknown state {state!r}") from None

    def job_path(self, state: str, name: str) -> Path:
        return self.state_dir(state) / check_name(name)

    def service_path(self, name: str) -> Path:
        """A hidden file or folder of the service in the root (outbox, API token, ...).

        Hidden entries are never jobs, so they are safe from listings and processors.
        """
        return self.root / f".{name}"

    def init(self, *, sweep_jobs: bool = True) -> None:
        """Create missing state folders, check them, sweep crash leftovers.

        With sweep_jobs False the job folders are left for the caller to sweep later
        (sweep_jobs()): looking into 100,000 of them takes seconds, which the service
        spends after it has started, not before.

        StoreError if the root cannot be used, or if a state folder or the trash is a
        symbolic link or not a folder: a rename would take jobs out of the root, and
        emptying the trash would empty whatever it points to.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for state in State:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(self.root / state)
            probe = self.root / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StoreError(f"jobs root {self.root} is not usable: {e.strerror or e}") from e
        for name in (*STATES, TRASH):
            self._check_own_folder(name, missing_ok=name == TRASH)
        if sweep_jobs:
            self.sweep()
        else:
            self._sweep_root()

    def _check_own_folder(self, name: str, *, missing_ok: bool) -> None:
        try:
            st = os.lstat(self.root / name)
        except FileNotFoundError:
            if missing_ok:
                return
            raise StoreError(f"{self.root / name} vanished while starting") from None
        if stat.S_ISLNK(st.st_mode):
            raise StoreError(
                f"{self.root / name} is a symbolic link: the service does not work through "
                "links in its jobs root; make it a folder (a mount point works)"
            )
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError(f"{self.root / name} is a {fs.kind(st.st_mode)}, not a folder")

    # -- finding and listing -----------------------------------------------------

    def find(self, name: str) -> Job | None:
        """The job's current state, or None. Checks twice to see through a move in flight.

        On the API's hot path (`GET /jobs/{id}`): plain string paths, one stat per state.
        """
        check_name(name)
        for _ in range(2):
            for state, base in zip(State, self._state_prefixes, strict=True):
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

        Once a state folder holds WATCH_FROM entries, the state folders are watched
        (batchingest.listings) and the names come from there, exact at every call
        without a rescan however often the folders change. Until then, or where
        inotify cannot be used:

        Paging `GET /jobs?limit=100` over 10,000 jobs must not rescan every entry: the
        listing is kept with the folder's (inode, nlink, mtime, ctime) and reused while
        those are the same. A listing is only kept when the folder had not changed for a
        second before the scan began, so two changes within one timestamp tick cannot
        hide behind an unchanged mtime.
        """
        listed = self._from_watch(lambda w: w.names(state))
        if listed is not None:
            return listed
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
        if len(names) >= self.watch_from:
            self._watch()
        # any entry change sets mtime to now, so an old mtime cannot hide a later one
        if started - st.st_mtime_ns > 1_000_000_000:
            cache[state] = (key, names)
        else:
            cache.pop(state, None)
        return names

    def job_count(self, state: str) -> int:
        """How many jobs one state holds (GET /metrics): job_names() without the list.

        Reuses job_names()'s listing or an earlier count while the folder is unchanged
        (the same rules); otherwise counts without sorting, and checks all names with
        one match over them (cheaper than a match per name). A large root's counts come
        from the inotify-kept listings (batchingest.listings), exact and without a scan.
        """
        watched = self._from_watch(lambda w: w.count(state))
        if watched is not None:
            return watched
        started = time.time_ns()
        try:
            st = os.stat(self.state_dir(state))
        except FileNotFoundError:
            return 0
        key = (st.st_ino, st.st_nlink, st.st_mtime_ns, st.st_ctime_ns)
        listed, counted = self._names_cache.get(state), self._count_cache.get(state)
        if listed is not None and listed[0] == key:
            return len(listed[1])
        if counted is not None and counted[0] == key:
            return counted[1]
        names = [e.name for e in self._entries(state) if e.is_dir(follow_symlinks=False)]
        joined = "".join(f"{n}\n" for n in names)
        if joined.count("\n") == len(names) and _NAMES.fullmatch(joined):
            count = len(names)  # every name valid (and none with a newline of its own)
        else:
            count = sum(1 for n in names if valid_name(n))
        if started - st.st_mtime_ns > 1_000_000_000:
            self._count_cache[state] = (key, count)
        if count >= self.watch_from:
            self._watch()
        return count

    def name_changes(
        self, state: str, old: builtins.list[str], new: builtins.list[str]
    ) -> dict[str, bool] | None:
        """The names added (True) or removed (False) between two listings job_names()
        gave for a state; None when that is not known (then compare the two)."""
        if not isinstance(old, listings.Names) or not isinstance(new, listings.Names):
            return None
        return self._from_watch(lambda w: w.changes(state, old, new))

    def _from_watch(self, read: Callable[[listings.Watched], T]) -> T | None:
        """read() of the inotify-kept listings, exact at this moment; None while the
        state folders are not watched."""
        watched = self._watched
        if watched is None:
            return None
        try:
            return read(watched)
        except (OSError, fs.UnsafePath) as e:  # a state folder went or is a link now
            log.warning("state folders are listed by scanning from now on: %s", e.strerror or e)
            self._unwatch(watched)
            return None

    def _watch(self) -> None:
        """Start keeping the state folders' listings by inotify (batchingest.listings).

        Not where inotify misses other machines' changes (a shared file system), and
        given up on for good where it cannot be had: scanning still gives true listings.
        """
        with self._watch_lock:
            if self._watched is not None or self._watch_given_up:
                return
            self._watch_given_up = True  # unless it works below
            if self.shared_fs is not None:
                return
            try:
                self._watched = listings.Watched(self.root_fd, STATES, valid_name)
            except (OSError, fs.UnsafePath) as e:
                log.info("state folders are listed by scanning: %s", e.strerror or e)
                return
            self._watch_given_up = False

    def _unwatch(self, watched: listings.Watched) -> None:
        with self._watch_lock:
            if self._watched is watched:
                self._watched = None
                self._watch_given_up = True
        watched.close()

    def jobs(self, states: Iterable[str] | None = None) -> builtins.list[Job]:
        """Jobs in the given states (all by default), sorted by name.

        Built from job_names(): directory entries (d_type) only, never a stat per job,
        so listing 10,000 jobs stays cheap.
        """
        jobs: builtins.list[Job] = []
        for state in State if states is None else map(State, states):
            base = self.state_dir(state)
            jobs.extend(Job(name, state, base / name) for name in self.job_names(state))
        jobs.sort(key=lambda j: (j.name, STATES.index(j.state)))
        return jobs

    def each_job(self, states: Iterable[str]) -> Iterator[Job]:
        """Every job of the given states, state by state, made one at a time: a pass over
        100,000 jobs does not hold 100,000 Job objects (and their paths) at once."""
        for state in map(State, states):
            base = f"{self.state_dir(state)}/"
            for name in self.job_names(state):
                yield Job(name, state, Path(base + name))

    def queued(self) -> builtins.list[str]:
        """Names of jobs in queue/, oldest first (folder mtime, then name).

        Anything in queue/ that is not a job (a stray file, a bad name) is logged once
        and skipped.
        """
        found: list[tuple[float, str]] = []
        for entry in self._entries(State.QUEUE):
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

    def moving_folder(self) -> int | None:
        """For a listener: the moved job folder's descriptor where the mover holds it
        open (a claim), so the listener need not open the folder again; else None.
        Valid only while the listener runs (the holder closes it later)."""
        return getattr(self._moving, "dir_fd", None)

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
        if self.mover is not None:
            return self.mover(name, src, dst)
        return self.move_here(name, src, dst)

    def move_here(self, name: str, src: str, dst: str) -> Job:
        """_move made by this process, whatever its mover (see Store.mover)."""
        source = self.job_path(src, name)
        for target_name in self._final_target(name) if dst in FINAL else [name]:
            target = self.state_dir(dst) / target_name
            try:
                rename_noreplace(str(source), str(target))
            except FileExistsError:
                continue
            except OSError as e:
                if e.errno == errno.ENOTEMPTY:
                    continue
                raise
            job = Job(target_name, State(dst), target)
            self._notify(job, src)
            return job
        if dst in FINAL:
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
        path = self.job_path(State.DATA, name)
        try:
            path.mkdir()
        except FileExistsError:
            return Job(name, State.DATA, path), False
        return Job(name, State.DATA, path), True

    def queue(self, name: str) -> tuple[Job, bool]:
        """Move a job from data/, error/ or success/ to queue/.

        Returns (job, moved); a job already in queue/ or processing/ is left alone.
        """
        for _ in range(3):
            job = self.get(name)
            if job.state in BUSY:
                return job, False
            try:
                return self._move(name, job.state, State.QUEUE), True
            except FileNotFoundError:
                continue  # it moved meanwhile: look again
            except FileExistsError:
                # the same name already waits in queue/: report that one
                return self.get(name), False
        raise JobBusy(f"job {name!r} keeps changing state")

    # -- holding (processors) -----------------------------------------------------

    def _hold(self, state: str, name: str) -> Hold | None:
        """Lock the job at state/NAME: a Hold, or None if it is not there or is held.

        The folder is opened without following links, it (or its `.lock`, see
        folder_locks) flock-ed, and then both are checked to be still in place: a job
        that moved meanwhile, or whose holder released (and removed) the `.lock` we
        opened, is not ours. A folder lock also needs a `.lock` file found there to be
        free (_old_lock_held). LockUnusable if the lock cannot be used at all.
        """
        rel = f"{State(state)}/{check_name(name)}"
        try:
            dir_fd = fs.open_dir(self.root_fd, rel)
        except (FileNotFoundError, NotADirectoryError, fs.UnsafePath):
            return None  # gone, or a link: not a job
        except OSError as e:
            if e.errno in SHORTAGE:
                raise
            raise LockUnusable(e.errno or 0, f"its folder cannot be opened ({e.strerror})") from e
        try:
            folder_lock = self._folder_locking()
            # when the job entered this folder (pickup latency): taken before a `.lock`
            # made in it moves the folder's ctime to now
            entered = None if folder_lock else os.fstat(dir_fd).st_ctime
            fd = -1 if folder_lock else _lock_at(dir_fd)
            # a folder lock: an earlier version's holder (an orphaned task) may hold
            # the `.lock` file instead
            folder_held = fd == -1 and (_lock_dir(dir_fd) and not _old_lock_held(dir_fd))
            locked = fd is not None and (fd >= 0 or folder_held)
        except BaseException:
            os.close(dir_fd)
            raise
        if fd is None or not locked:
            os.close(dir_fd)
            return None
        try:
            here = os.stat(rel, dir_fd=self.root_fd, follow_symlinks=False)
            in_place = fs.same_inode(here, os.fstat(dir_fd))
            in_place = in_place and (fd < 0 or _is_our_lock(dir_fd, fd))
        except OSError:
            in_place = False
        if not in_place:
            if fd >= 0:
                os.close(fd)
            os.close(dir_fd)
            return None
        return Hold(name, self.root / rel, fd, dir_fd, ctime=entered or here.st_ctime)

    def _unusable(self, where: str, e: LockUnusable) -> None:
        """Say once per job that its `.lock` keeps it from being taken."""
        if where not in self._lock_warned:
            self._lock_warned.add(where)
            log.warning("skipping %s: %s; fix or remove it to let the job run", where, e.strerror)

    def claim(self, name: str) -> Hold | None:
        """Take a queued job into processing/; None if another processor got it first.

        The lease is put in place before the rename: a job another host is claiming (its
        lease is there and alive) is left to it. A job whose `.lock` or `.lease` cannot
        be used is skipped (logged once), never fatal. On a local file system there is
        no other host, and the lock alone holds the job: no lease.
        """
        try:
            hold = self._hold(State.QUEUE, name)
            if hold is None:
                return None
            clock = lease.Clock(self.root_fd, self.owner.host)
            if self.uses_leases and not self._take_lease(hold, clock):
                return None
        except LockUnusable as e:
            self._unusable(f"queue/{name}", e)
            return None
        outer, self._moving.dir_fd = self.moving_folder(), hold.dir_fd
        try:
            self._move(name, State.QUEUE, State.PROCESSING)
        except OSError:
            hold.release()
            return None
        finally:
            self._moving.dir_fd = outer  # (a claim made by a listener of another)
        hold.path = self.job_path(State.PROCESSING, name)
        return hold

    def _take_lease(self, hold: Hold, clock: lease.Clock) -> lease.Acquired | None:
        """Give a locked job our lease; None (the hold abandoned) while another lives.

        Abandoned, not released: on a file system whose locks are not shared, the
        `.lock` we locked is also the live holder's, and must stay.
        """
        try:
            got = lease.acquire(hold.dir_fd, self.owner, self.lease_timeout, clock, self.local)
        except lease.LeaseUnusable as e:
            hold.abandon()
            raise LockUnusable(e.errno or 0, e.strerror) from None
        except BaseException:
            hold.abandon()
            raise
        if got is None:
            hold.abandon()
            return None
        hold.lease = got.held
        return got

    def finish(self, hold: Hold, state: str) -> Job:
        """Move a held job out of processing/ and release it (its `.lock` goes too)."""
        try:
            return self._move(hold.name, State.PROCESSING, state)
        finally:
            hold.release()

    def unqueue(self, name: str) -> Job | None:
        """Take a queued job back to data/ under its lock, so no processor claims it
        meanwhile. None if it is not in queue/, a processor holds it (it is being
        claimed), or data/ has a folder of that name already.
        """
        try:
            hold = self._hold(State.QUEUE, name)
        except LockUnusable as e:
            self._unusable(f"queue/{name}", e)
            return None
        if hold is None:
            return None
        try:
            return self._move(name, State.QUEUE, State.DATA)
        except (FileNotFoundError, FileExistsError):
            return None
        finally:
            hold.release()

    def recover(self) -> builtins.list[str]:
        """Return jobs in processing/ that no live process holds to queue/.

        A job is taken back only once its lock is ours and its lease is no longer
        alive (see batchingest.lease): on this machine a dead holder is known at once,
        another host's holder only when its lease has expired. A job run by a live
        processor, or still held by an orphaned task, is left alone. Holding it proves
        its writers are gone, so their temporaries go at once.
        """
        recovered: builtins.list[str] = []
        clock = lease.Clock(self.root_fd, self.owner.host)
        for entry in self._entries(State.PROCESSING):
            if not valid_name(entry.name):
                continue
            try:
                hold = self._hold(State.PROCESSING, entry.name)
                got = None if hold is None else self._take_lease(hold, clock)
            except LockUnusable as e:
                self._unusable(f"processing/{entry.name}", e)
                continue
            if hold is None or got is None:
                continue
            try:
                self._sweep_job(hold.dir_fd, min_age=0.0, locks=False)
                try:
                    self._move(entry.name, State.PROCESSING, State.QUEUE)
                except (FileNotFoundError, FileExistsError):
                    continue
                recovered.append(entry.name)
                why = got.broke or "its processor is gone"
                log.warning("recovered %s: back to queue/ (%s)", entry.name, why)
            finally:
                hold.release()
        return recovered

    def other_hosts(self, limit: int = 100) -> builtins.list[str]:
        """Other hosts than this one (owner) seen using the root, sorted: the hosts of the
        leases on the first `limit` jobs in processing/, and of the `.clock-HOST` probe
        files (lease.shared_now) in the root. Evidence that other machines mount it;
        what cannot be read is passed over (this is only a look)."""
        hosts: set[str] = set()
        mine = lease.clock_name(self.owner.host)
        with contextlib.suppress(OSError):
            for probe in fs.entries(self.root_fd, hidden=True):
                if probe.name.startswith(lease.CLOCK_PREFIX) and probe.name != mine:
                    hosts.add(probe.name.removeprefix(lease.CLOCK_PREFIX))
        with contextlib.suppress(OSError):  # processing/ itself may be unreadable
            for job in itertools.islice(self._entries(State.PROCESSING), limit):
                with contextlib.suppress(OSError):
                    dir_fd = fs.open_dir(self.root_fd, f"processing/{job.name}")
                    try:
                        found = lease.read(dir_fd)
                    finally:
                        os.close(dir_fd)
                    if found and found.owner and found.owner.host != self.owner.host:
                        hosts.add(found.owner.host)
        return sorted(hosts)

    def stuck(
        self, me: lease.Owner | None = None, timeout: float | None = None
    ) -> builtins.list[str]:
        """Jobs in processing/ that no live holder holds: those recover() would take
        back now, by the same rule, only looked at (nothing is taken, created or moved).
        me and timeout: this host's holder and --lease-timeout (the store's own if None).

        Also those that cannot be told (a `.lock` or `.lease` that is a link or a
        special file, which no processor would use): they need a person as much.
        """
        me = me or self.owner
        looks = Looks(me, _LookingClock(self.root_fd, me.host), timeout or self.lease_timeout)
        names = [e.name for e in self._entries(State.PROCESSING) if valid_name(e.name)]
        return sorted(name for name in names if self._held(name, looks) is not True)

    def _held(self, name: str, looks: Looks) -> bool | None:
        """Does a live holder hold this job in processing/? None if it cannot be told.

        Held: some process keeps an exclusive flock on its folder or its `.lock` (a
        non-blocking one of ours is refused; if it succeeds it is dropped at once), or
        its lease still holds it (lease.stale says so: its pid lives on this host, or it
        was renewed within --lease-timeout), as recover() judges.
        """
        try:
            dir_fd = fs.open_dir(self.root_fd, f"processing/{name}")
        except (FileNotFoundError, NotADirectoryError):
            return True  # it left processing/ meanwhile: someone is moving it
        except fs.UnsafePath:
            return None
        except OSError as e:
            if e.errno in SHORTAGE:
                raise
            return None  # a folder that cannot be opened (EACCES): no holder can be told
        try:
            try:
                locked = _lock_taken(dir_fd, self._folder_locking())
            except LockUnusable:
                return None  # its folder cannot be locked (ENOLCK, say)
            if locked is not False:
                return locked
            try:
                found = lease.read(dir_fd)
            except lease.LeaseUnusable:
                return None
            if found and lease.stale(found, looks.me, looks.now, looks.timeout) is None:
                return True
            # free, unless the folder we looked at has left processing/ meanwhile
            there = fs.lstat(self.root_fd, f"processing/{name}")
            return there is None or not fs.same_inode(there, os.fstat(dir_fd))
        finally:
            os.close(dir_fd)

    # -- crash leftovers ---------------------------------------------------------------

    def sweep(self) -> int:
        """Remove what a crash (kill -9, power cut) leaves in the root; the count removed.

        The trash (jobs half-deleted), init's `.probe-*` files, and in the job folders
        of every state but processing/: write_atomic temporaries at least SWEEP_AGE
        seconds old, and `.lock` files nobody holds (earlier versions left one in every
        job). Jobs in processing/ are swept by recover(), once their holder is known dead.
        """
        removed = self._sweep_root() + self.sweep_jobs()
        if removed:
            log.info("removed %d leftover(s) of interrupted work in %s", removed, self.root)
        return removed

    def _sweep_root(self) -> int:
        """The trash and init's `.probe-*` files: what sweep() removes outside job folders."""
        removed = self._empty_trash()
        for entry in fs.entries(self.root_fd, hidden=True):
            if entry.name.startswith(".probe-") and entry.is_file:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.name, dir_fd=self.root_fd)
                    removed += 1
        return removed

    def sweep_jobs(self) -> int:
        """The job folders' part of sweep(): stale temporaries, free `.lock` files, and
        the cancel requests left in finished or ready jobs (a crash between a canceled
        job's last move and the removal of its request: moved back to queue/ by hand,
        such a job must not be canceled again).

        Safe while processors and the API run: a `.lock` is only removed while its
        lock is ours for that moment (a claim meanwhile fails and is tried again).
        """
        removed = 0
        for state in (State.DATA, State.QUEUE, State.SUCCESS, State.ERROR):
            for name in self.job_names(state):
                try:
                    dir_fd = fs.open_dir(self.root_fd, f"{state}/{name}")
                except (OSError, fs.UnsafePath):
                    continue  # moved on meanwhile
                try:
                    removed += self._sweep_job(
                        dir_fd, min_age=SWEEP_AGE, locks=True, requests=state != State.QUEUE
                    )
                except OSError as e:  # an unreadable job: leave it, it is not fatal
                    log.warning("cannot sweep %s/%s: %s", state, name, e.strerror or e)
                finally:
                    os.close(dir_fd)
        return removed

    def _empty_trash(self) -> int:
        try:
            trash_fd = fs.open_dir(self.root_fd, TRASH)
        except FileNotFoundError:
            return 0
        removed = 0
        try:
            for entry in fs.entries(trash_fd, hidden=True):
                with contextlib.suppress(OSError):
                    fs.remove(trash_fd, entry.name, recursive=True)
                    removed += 1
        finally:
            os.close(trash_fd)
        return removed

    def _sweep_job(
        self, dir_fd: int, *, min_age: float, locks: bool, requests: bool = False
    ) -> int:
        """Remove stale temporaries (and, with locks, a free `.lock`; with requests, a
        cancel request) in one job folder."""
        removed = 0
        now = time.time()
        for entry in fs.entries(dir_fd, hidden=True):
            try:
                if entry.name == LOCK_FILE and locks:
                    removed += _drop_free_lock(dir_fd)
                elif entry.name == CANCEL_FILE and requests:
                    os.unlink(CANCEL_FILE, dir_fd=dir_fd)
                    removed += 1
                elif entry.is_file and _TEMP.fullmatch(entry.name):
                    st = os.stat(entry.name, dir_fd=dir_fd, follow_symlinks=False)
                    if now - st.st_mtime >= min_age:
                        os.unlink(entry.name, dir_fd=dir_fd)
                        removed += 1
            except OSError:
                continue  # gone meanwhile, or not ours to remove: leave it
        return removed

    # -- deleting ------------------------------------------------------------------

    def _trash_fd(self) -> int:
        """The hidden trash folder, made if missing; never a link (StoreError)."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(TRASH, 0o755, dir_fd=self.root_fd)
        try:
            return fs.open_dir(self.root_fd, TRASH)
        except (fs.UnsafePath, NotADirectoryError) as e:
            raise StoreError(f"{self.root / TRASH} is not a folder: {e.strerror}") from None

    def delete(self, name: str) -> bool:
        """Remove a job and all its files. False if there was none; JobBusy if held.

        The job is first renamed into the hidden trash folder, so no listing shows and
        no processor claims a half-deleted job.
        """
        trash_fd = self._trash_fd()
        try:
            for _ in range(3):
                job = self.find(name)
                if job is None:
                    return False
                if job.state == State.PROCESSING:
                    raise JobBusy(f"job {name!r} is being processed")
                try:
                    hold = self._hold(job.state, name)
                except LockUnusable as e:
                    raise JobBusy(f"job {name!r} cannot be locked: {e.strerror}") from None
                if hold is None:
                    if not _is_real_dir(str(job.path)):
                        continue
                    raise JobBusy(f"job {name!r} is held by a processor")
                # shortened: NAME plus the suffix must stay a legal file name
                target = f"{name[:200]}.{uuid.uuid4().hex}"
                try:
                    os.rename(
                        f"{job.state}/{name}", target, src_dir_fd=self.root_fd, dst_dir_fd=trash_fd
                    )
                except FileNotFoundError:
                    continue
                finally:
                    hold.release()
                with contextlib.suppress(OSError):
                    fs.remove_tree(trash_fd, target)
                return True
            raise JobBusy(f"job {name!r} keeps changing state")
        finally:
            os.close(trash_fd)

    # -- for the HTTP API --------------------------------------------------------------

    def hold_unqueued(self, name: str, wait: float = 5.0) -> Hold | None:
        """Hold a job that is in data/, success/ or error/ while its files are changed.

        With the job's lock taken no processor can claim it and nobody can delete it,
        so an upload renamed into place under the hold is complete before any task
        sees the job, even if it is queued meanwhile. Another holder of an unqueued job
        is another upload committing or a delete, both brief, so we wait up to `wait`
        seconds for it. None if the job is queued, processing or still held after that
        (or its `.lock` cannot be used); JobNotFound if there is none.
        """
        deadline = time.monotonic() + wait
        moves = 0
        while moves < 3:
            job = self.get(name)
            if job.state in BUSY:
                return None
            try:
                hold = self._hold(job.state, name)
            except LockUnusable as e:
                self._unusable(f"{job.state}/{name}", e)
                return None
            if hold is not None:
                return hold
            if not _is_real_dir(str(job.path)):
                moves += 1  # moved meanwhile: look again
            elif time.monotonic() >= deadline:
                return None
            else:
                time.sleep(0.002)
        raise JobBusy(f"job {name!r} keeps changing state")

    # the old name of jobs(); it shadowed the builtin inside this class
    list = jobs


def _drop_free_lock(dir_fd: int) -> int:
    """Remove the `.lock` of a job folder if nobody holds it (1 if removed)."""
    try:
        fd = _lock_at(dir_fd)
    except LockUnusable:
        return 0  # a folder or link of that name is the job's content: not ours
    if fd is None:
        return 0
    try:
        if _is_our_lock(dir_fd, fd):
            os.unlink(LOCK_FILE, dir_fd=dir_fd)
            return 1
        return 0
    finally:
        os.close(fd)
