"""The built-in `stage` task: copy a staging job's files from the archive to the staging area.

Run as `python -m batchingest.tasks.stage` in the job folder, like any task. Reads
`MANIFEST.json`, writes `PROGRESS.json`, explains every file on stdout (the job's LOG).

Every copy goes to a temporary file in its target folder and gets its real name only once
complete and on disk, so the staging area never shows a partial file under a real name,
even after `kill -9` or a power cut. The temporary file is unnamed (O_TMPFILE, then
linkat) where the file system allows it, so a killed copy leaves nothing; elsewhere it is
a hidden `.batchingest-stage-JOB.N.tmp`, flock-ed while in use, renamed into place, and
removed by the next run in that folder if a copy was killed. Files already staged (same
size and modification time) are not copied again, which is also how a re-queued job
finishes the rest.

Durability without an fsync per file: the worker threads put their complete small
copies into one shared group; a full group (copyengine.group_size) is flushed with one
`syncfs` of the staging file system (a group of fewer than 8: an fsync each) and only
then named, so 10,000 small files cost a handful of syncfs calls, not one per file or
per thread.
Large files get their own fsync (after a copy in order whose writeback follows it
step by step, copyengine.copy_flushing) and are named at once. Without syncfs each copy is
fsync-ed before it is named. Before the task reports success an fsync of every folder
that got a name (and of the folders above it) makes the names durable: a journal commit,
not another syncfs, which would also wait for whatever else the file system's other
users have written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import secrets
import stat
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from batchingest import fs
from batchingest.copyengine import (
    GROUP_BYTES,
    LARGE,
    RESERVED_FDS,
    copy_fd,
    copy_flushing,
    group_size,
    sha256_fd,
    syncfs_group,
)
from batchingest.flags import env_bool
from batchingest.staging import (
    MANIFEST,
    PROGRESS,
    TEMP_PREFIX,
    TEMP_SUFFIX,
    Catalog,
    Entry,
    Progress,
    StagingError,
    load_manifest,
    manifest_limit,
    read_progress,
    split_rel,
    write_progress,
)

PROGRESS_EVERY = 0.5
# What a worker thread takes at a time: enough to keep the threads busy, few enough
# that none is left with a long tail.
CHUNK_FILES = 64
CHUNK_BYTES = 64 << 20
# A temporary file this old and not locked is a dead copy of some other job.
STALE_AFTER = 60.0
# Errors that are about the staging area, not one source file: stop at once.
TARGET_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


class SourceError(Exception):
    """One file cannot be staged (vanished, unreadable, changed, mismatch, or a link,
    FIFO or device on its way in the archive or in the staging area)."""


class TargetError(Exception):
    """The staging area cannot take files (full, read-only): stop everything."""


# Folders each side keeps open (fs.Folders): a request naming more opens the others for
# each use. group_size sets descriptors aside for both sides' (descriptor_reserve).
KEEP_OPEN = 64
# What a worker thread holds open besides the kept folders and waiting copies: the
# archive file, a folder opened for one use on each side.
FDS_PER_THREAD = 3


def descriptor_reserve(parallel: int) -> int:
    """Descriptors group_size leaves beside the waiting copies: the usual set-aside
    (stdio, the job folder, the two areas...), both sides' kept folders, each thread's own."""
    return RESERVED_FDS + 2 * KEEP_OPEN + FDS_PER_THREAD * parallel


def staged_copy_matches(src: int, dir_fd: int, name: str) -> bool:
    """Whether an existing staged file has the archive file's SHA-256."""
    try:
        fd = fs.open_regular(dir_fd, name)
    except OSError:
        return False
    try:
        return sha256_fd(src) == sha256_fd(fd)
    finally:
        os.close(fd)
        os.lseek(src, 0, os.SEEK_SET)  # the copy that may follow reads from the start


_temp_ids = itertools.count()
_RUN = f"{os.getpid()}-{secrets.token_hex(4)}"


def temp_name(job: str) -> str:
    """A temporary name unique to this run (no random numbers per file: it's a hot path)."""
    return f"{TEMP_PREFIX}{job}.{_RUN}-{next(_temp_ids)}{TEMP_SUFFIX}"


def remove_leftovers(dir_fd: int, job: str) -> int:
    """Remove dead temporary copies in the folder dir_fd: ours, or anyone's unlocked and
    stale. Only regular files are opened (a link or FIFO of that name is left alone)."""
    removed = 0
    with contextlib.suppress(OSError):
        for name, kind in fs.kinds(dir_fd, hidden=True):
            if kind == stat.S_IFREG and name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX):
                removed += _remove_leftover(dir_fd, name, name.startswith(f"{TEMP_PREFIX}{job}."))
    return removed


def _remove_leftover(dir_fd: int, name: str, mine: bool) -> int:
    try:
        # not listed=True: a FIFO swapped in since the listing is refused from its lstat,
        # never opened
        fd, st = fs.open_regular_stat(dir_fd, name)
    except OSError:
        return 0
    try:
        # a live copy holds its lock; the age check covers the instant between its
        # creation and its lock
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if mine or time.time() - st.st_mtime > STALE_AFTER:
            os.unlink(name, dir_fd=dir_fd)
            return 1
    except OSError:
        pass
    finally:
        os.close(fd)
    return 0


def already_staged(dir_fd: int, name: str, st: os.stat_result) -> bool:
    """The target is a regular file of the source's size and modification time."""
    try:
        tst = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (
        stat.S_ISREG(tst.st_mode)
        and tst.st_size == st.st_size
        and tst.st_mtime_ns == st.st_mtime_ns
    )


@dataclass
class Pending:
    """A complete copy waiting for its batch's flush before it gets its real name.

    Either an unnamed O_TMPFILE inode kept open (fd) or a named hidden file (tmp), in
    the staging folder `folder` (relative to the staging area), to be named `name`.
    """

    folder: str
    name: str
    entry: Entry
    fd: int = -1
    tmp: str = ""
    flushed: bool = False  # fsync-ed on its own (a large file): needs no group

    def discard(self, targets: fs.Folders, dir_fd: int | None = None) -> None:
        """Drop the copy. dir_fd: its folder, still open; without it the folder is opened
        again by name, which finds nothing of ours if it was swapped meanwhile (the next
        run's sweep removes what is left)."""
        if self.fd >= 0:
            os.close(self.fd)  # an unnamed file disappears with its last descriptor
            self.fd = -1
        if not self.tmp:
            return
        if dir_fd is not None:
            with contextlib.suppress(OSError):
                _unlink(dir_fd, self.tmp)
        else:
            with contextlib.suppress(OSError, TargetError), targets.open(self.folder) as fd:
                _unlink(fd, self.tmp)
        self.tmp = ""


@dataclass
class Folder:
    """A staging folder copies go to (its descriptor: Stager.targets)."""

    rel: str
    unnamed: bool  # O_TMPFILE and linkat work here
    fresh: bool = False  # created by this run: nothing in it can be staged already


@dataclass
class Stager:
    archive: Path
    staging: Path
    job: str
    verify: bool
    progress: Progress
    out: list[str] = field(default_factory=list)  # LOG lines not yet written
    errors: list[str] = field(default_factory=list)
    abort: threading.Event = field(default_factory=threading.Event)
    copied: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        # Both areas are endpoint folders, so user input: every file is opened by one
        # name in a folder opened beneath these descriptors, no link followed (fs).
        # The archive is only looked in (fs.LOOKUP): folders with search permission but
        # no read (0711) serve as they did for paths. The staging side is listed and fsync-ed.
        self.archive_fd = open_area(self.archive, "archive", fs.LOOKUP)
        try:
            self.staging_fd = open_area(self.staging, "staging area")
        except BaseException:
            os.close(self.archive_fd)
            raise
        self.sources = fs.Folders(self.archive_fd, KEEP_OPEN, fs.lookup_dir)
        self.targets = fs.Folders(self.staging_fd, KEEP_OPEN, self._make_folder)
        # BATCHINGEST_STAGE_UNNAMED=0 forces hidden named temporary files
        unnamed = _env_flag("BATCHINGEST_STAGE_UNNAMED", True)
        self.linker = fs.probe_unnamed(self.staging_fd, temp_name("probe")) if unnamed else None
        self.staging_dev = os.fstat(self.staging_fd).st_dev
        # staging folders met so far (dict updates are atomic under the GIL)
        self.made: dict[str, Folder] = {"": Folder("", self.linker is not None)}
        # complete small copies waiting for one syncfs (guarded by lock)
        self.group: list[Pending] = []
        self.group_bytes = 0
        self.group_files = 1  # set by copy_all (group_size)
        # one flush at a time: bounds the copies held open to a group per thread, plus one
        self.flushing = threading.Lock()
        self.named: set[str] = set()  # folders given new names: flushed at the end

    def close(self) -> None:
        self.sources.close()
        self.targets.close()
        os.close(self.archive_fd)
        os.close(self.staging_fd)

    # -- helpers shared by the worker threads ------------------------------------------

    def flush_log(self) -> None:
        with self.lock:
            lines, self.out = self.out, []
        if lines:
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()

    def save(self, job_fd: int) -> None:
        with self.lock:
            snapshot = Progress(**vars(self.progress))
        write_progress(job_fd, snapshot)

    def done(self, entry: Entry, how: str) -> None:
        with self.lock:
            self.progress.files_staged += 1
            self.progress.bytes_staged += entry.size
            if how == "copied":
                self.copied += 1
                self.progress.bytes_copied += entry.size
            else:
                self.skipped += 1
            self.out.append(f"{how} {entry.path} ({entry.size} bytes)")

    def fail(self, entry: Entry, reason: str) -> None:
        self.problem(f"{entry.path}: {reason}")

    def problem(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)
            self.out.append(f"ERROR {text}")

    def _make_folder(self, top: int, rel: str) -> int:
        """Open the staging folder rel (targets' opener), creating what is missing.

        A link or file on the way is UnsafePath or NotADirectoryError (that file fails);
        any other error is about the staging area (TargetError: stop).
        """
        made: list[str] = []
        try:
            fd = fs.make_dirs(top, rel.split("/"), made)
        except (fs.UnsafePath, NotADirectoryError):
            raise
        except OSError as e:
            raise TargetError(f"cannot create staging folder {rel}: {e.strerror}") from None
        if rel not in self.made:
            # another file system mounted inside the staging area gets its own chance to fail
            unnamed = self.linker is not None and os.fstat(fd).st_dev == self.staging_dev
            self.made[rel] = Folder(rel, unnamed, fresh=made[-1:] == [rel])
        return fd

    def open_source(self, rel: str) -> tuple[int, os.stat_result]:
        """Open an archive file by one name in its folder, both beneath the archive.

        No link is followed, on the way or at the name, whether it leads out or not; a
        FIFO or device is refused from its lstat, never opened (fs.open_regular_stat).
        """
        parent, name = split_rel(rel)
        try:
            with self.sources.open(parent) as dir_fd:
                return fs.open_regular_stat(dir_fd, name)
        except FileNotFoundError:
            raise SourceError("vanished from the archive (No such file or directory)") from None
        except fs.UnsafePath as e:
            raise SourceError(f"in the archive: {e.strerror}") from None
        except fs.NotRegular as e:
            raise SourceError(f"in the archive: {e.strerror}, not opened") from None
        except OSError as e:
            raise SourceError(f"cannot be read from the archive ({e.strerror})") from None

    def copy(self, src: int, dst: int, size: int) -> int:
        if size < LARGE or not hasattr(os, "copy_file_range"):
            return copy_fd(src, dst, size)
        return copy_flushing(src, dst, size)

    def create(self, folder: Folder, dir_fd: int, name: str, mode: int) -> Pending:
        """An empty temporary file for name in the staging folder dir_fd: unnamed if
        possible, else hidden and locked.

        Its permissions are the source's less the umask, as with cp.
        """
        p = Pending(folder.rel, name, Entry("", "", 0))
        if folder.unnamed:
            try:
                p.fd = fs.open_unnamed(dir_fd, mode)
                return p
            except OSError:
                folder.unnamed = False
        tmp = temp_name(self.job)
        try:
            fd = fs.create_new(dir_fd, tmp, os.O_RDWR, mode)
            if fd is None:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), tmp)
        except OSError as e:
            where = folder.rel or "the staging area's top folder"
            raise TargetError(f"cannot create a file in {where}: {e.strerror}") from None
        p.fd, p.tmp = fd, tmp
        # the lock tells remove_leftovers in another job's task that this copy is alive
        fcntl.flock(p.fd, fcntl.LOCK_EX)
        return p

    # -- one file ----------------------------------------------------------------------

    def prepare(self, entry: Entry) -> Pending | None:
        """Copy one file to a temporary file; None if it is already staged.

        The archive file is opened first: one that cannot be staged makes no folder.
        """
        parent, name = split_rel(entry.path)
        src, st = self.open_source(entry.path)
        try:
            with self.targets.open(parent) as dir_fd:
                return self.prepare_in(self.made[parent], dir_fd, name, entry, src, st)
        except (fs.UnsafePath, NotADirectoryError) as e:  # only the folder's open says these
            raise SourceError(f"staging folder {parent}: {e.strerror}") from None
        finally:
            os.close(src)

    def prepare_in(
        self, folder: Folder, dir_fd: int, name: str, entry: Entry, src: int, st: os.stat_result
    ) -> Pending | None:
        # a folder this run created holds nothing yet: saves a lookup per file
        if not folder.fresh and already_staged(dir_fd, name, st):
            if not self.verify:
                self.done(entry, "already staged")
                return None
            # with --stage-verify a copy that merely looks right is not trusted
            if staged_copy_matches(src, dir_fd, name):
                self.done(entry, "already staged, SHA-256 verified")
                return None
            with self.lock:
                self.out.append(f"{entry.path}: staged copy differs from the archive "
                                "(SHA-256); copying again")  # fmt: skip
        p = self.create(folder, dir_fd, name, stat.S_IMODE(st.st_mode) & 0o777)
        p.entry = entry
        try:
            self.fill(src, st, p)
        except BaseException:
            p.discard(self.targets, dir_fd)  # in the folder the copy was made in
            raise
        return p

    def fill(self, src: int, st: os.stat_result, p: Pending) -> None:
        """Copy the open archive file src into p, checked, with the source's times."""
        try:
            copied = self.copy(src, p.fd, st.st_size)
        except OSError as e:
            if e.errno in TARGET_ERRNOS:
                raise TargetError(f"staging area: {e.strerror}") from None
            raise SourceError(f"cannot be copied ({e.strerror})") from None
        after = os.fstat(src)
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            raise SourceError("changed in the archive while being copied")
        if copied != st.st_size:
            raise SourceError("copy is shorter than the archive file")
        if self.verify:
            a, b = sha256_fd(src), sha256_fd(p.fd)
            if a != b:
                raise SourceError(f"SHA-256 mismatch: archive {a}, copy {b}")
        os.utime(p.fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        if st.st_size >= LARGE:
            os.fsync(p.fd)
            p.flushed = True

    def commit(self, pending: list[Pending]) -> None:
        """Give flushed copies their real names; a rename or link never shows a partial file."""
        for p in pending:
            try:
                with self.targets.open(p.folder) as dir_fd:
                    try:
                        self.name_copy(p, dir_fd)
                    finally:
                        p.discard(self.targets, dir_fd)  # in the folder just named in
            except (OSError, TargetError) as e:
                p.discard(self.targets)  # its folder could not be opened: the fd at least
                reason = e.strerror if isinstance(e, OSError) else str(e)
                self.fail(p.entry, f"cannot be put in place in the staging area ({reason})")
                continue
            self.named.add(p.folder)
            self.done(p.entry, "copied")

    def name_copy(self, p: Pending, dir_fd: int) -> None:
        """Name p in its folder dir_fd. What is at that name (an older copy, a link) is
        replaced by one rename, never followed."""
        if not p.tmp:
            assert self.linker is not None
            try:
                fs.link_fd(p.fd, p.name, self.linker, dir_fd=dir_fd)
                return
            except FileExistsError:
                p.tmp = temp_name(self.job)
                fs.link_fd(p.fd, p.tmp, self.linker, dir_fd=dir_fd)
        os.rename(p.tmp, p.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        p.tmp = ""

    def flush_names(self) -> None:
        """fsync each folder that got names, and the folders up to the staging area's top
        (some were made by this run): the names are on disk once this returns."""
        folders: set[str] = set()
        for rel in self.named:
            while rel not in folders:
                folders.add(rel)
                if rel == "":
                    break
                rel = split_rel(rel)[0]
        for rel in sorted(folders):
            with self.targets.open(rel) as dir_fd:
                os.fsync(dir_fd)

    # -- groups of small copies, one syncfs each -----------------------------------------

    def wait_for_flush(self, p: Pending) -> None:
        """Add a complete small copy to the open group; flush the group once it is full."""
        with self.lock:
            self.group.append(p)
            self.group_bytes += p.entry.size
            if len(self.group) < self.group_files and self.group_bytes < GROUP_BYTES:
                return
            full, self.group, self.group_bytes = self.group, [], 0
        self.flush(full)

    def flush(self, pending: list[Pending]) -> None:
        """One syncfs for the lot (an fsync each for a few, or where there is no syncfs),
        then their names.

        A copy gets its name only after its data is on disk: a crash before leaves no
        file under that name, a crash after leaves the complete file.
        """
        with self.flushing:
            try:
                if not syncfs_group(len(pending), pending[0].fd):
                    for p in pending:
                        os.fsync(p.fd)
            except OSError as e:
                for p in pending:
                    p.discard(self.targets)
                raise TargetError(f"staging area: {e.strerror}") from None
            self.commit(pending)

    def flush_rest(self) -> None:
        """The last, partly filled group: named unless the run was stopped."""
        with self.lock:
            rest, self.group, self.group_bytes = self.group, [], 0
        if rest and not self.abort.is_set():
            try:
                self.flush(rest)
            except TargetError as e:
                self.problem(str(e))
        for p in rest:
            p.discard(self.targets)

    # -- a chunk of files, run by one worker thread ---------------------------------------

    def run_chunk(self, chunk: list[Entry]) -> None:
        for entry in chunk:
            if self.abort.is_set():
                return
            try:
                p = self.prepare(entry)
                if p is None:
                    continue
                if p.flushed:
                    self.commit([p])
                else:
                    self.wait_for_flush(p)
            except SourceError as e:
                self.fail(entry, str(e))
            except TargetError as e:
                self.fail(entry, str(e))
                self.abort.set()
                return
            except OSError as e:
                self.fail(entry, f"{e.strerror or e}")
                if e.errno in TARGET_ERRNOS:
                    self.abort.set()
                    return


def open_area(path: Path, what: str, flags: int = os.O_RDONLY | os.O_DIRECTORY) -> int:
    """A descriptor for the archive or the staging area; StagingError if it cannot be
    opened (unmounted, no permission): the task cannot start."""
    try:
        return fs.open_root(path, flags)
    except OSError as e:
        raise StagingError(f"the {what} {path} cannot be opened: {e.strerror or e}") from None


def _unlink(dir_fd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def chunks(entries: list[Entry]) -> Iterator[list[Entry]]:
    """Work for one thread at a time: a large file alone, small ones CHUNK_FILES together."""
    chunk: list[Entry] = []
    size = 0
    for e in entries:
        if e.size >= LARGE:
            yield [e]
            continue
        chunk.append(e)
        size += e.size
        if len(chunk) >= CHUNK_FILES or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _env_path(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        raise StagingError(f"{name} is not set: the service has no staging configured")
    path = Path(value)
    if not path.is_dir():
        raise StagingError(f"{name}={value} is not a folder")
    return path


@dataclass
class Settings:
    """The task's settings, all from its environment (never from the manifest)."""

    archive: Path
    staging: Path
    catalog: Path | None
    max_ids: int
    parallel: int
    verify: bool

    @classmethod
    def from_env(cls) -> Settings:
        catalog = os.environ.get("BATCHINGEST_CATALOG")
        return cls(
            archive=_env_path("BATCHINGEST_ARCHIVE"),
            staging=_env_path("BATCHINGEST_STAGING"),
            catalog=Path(catalog) if catalog else None,
            max_ids=max(1, _env_int("BATCHINGEST_STAGING_MAX_IDS", 10_000)),
            parallel=max(1, _env_int("BATCHINGEST_STAGE_PARALLEL", 4)),
            verify=_env_flag("BATCHINGEST_STAGE_VERIFY", False),
        )


def _env_flag(name: str, default: bool) -> bool:
    """A boolean read as the service reads it (flags.env_bool), so "no" means off."""
    try:
        return env_bool(name, default)
    except ValueError as e:
        raise StagingError(str(e)) from None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name) or str(default)
    try:
        return int(value)
    except ValueError:
        raise StagingError(f"{name}={value} is not a whole number") from None


def through_catalog(entries: list[Entry], ids: dict[str, str]) -> tuple[list[Entry], list[Entry]]:
    """(entries with the catalog's path for their id, entries whose id it does not know).

    With a catalog only ids are trusted: a manifest is user input (anyone may upload one
    into a job), so the paths written in it are ignored. Ids naming one file give one.
    """
    found: list[Entry] = []
    unknown: list[Entry] = []
    seen: set[str] = set()
    for e in entries:
        rel = ids.get(e.id)
        if rel is None:
            unknown.append(e)
        elif rel not in seen:
            seen.add(rel)
            found.append(Entry(e.id, rel, e.size))
    return found, unknown


def load_entries(job_fd: int, cfg: Settings) -> tuple[list[Entry], list[Entry]]:
    """The files to stage, and (with a catalog) those whose id the catalog does not know."""
    entries = load_manifest(job_fd, manifest_limit(cfg.max_ids))
    if cfg.catalog is None:
        return entries, []
    ids = Catalog(cfg.catalog).ids()
    differ = sum(1 for e in entries if ids.get(e.id, e.path) != e.path)
    if differ:
        print(f"stage: {differ} of {len(entries)} paths in {MANIFEST} differ from the catalog; "
              "the catalog's are used")  # fmt: skip
    return through_catalog(entries, ids)


def record_error(job_fd: int, message: str) -> None:
    """Say why the task cannot start, in the LOG and (if it can be written) PROGRESS.json."""
    print(f"ERROR stage: {message}", flush=True)
    progress = read_progress(job_fd) or Progress()
    progress.error = message
    progress.bytes_copied = 0  # this run copied nothing
    try:
        write_progress(job_fd, progress, durable=True)
    except OSError as e:
        print(f"ERROR stage: {PROGRESS} cannot be written: {e.strerror or e}", flush=True)


def sweep(stager: Stager, entries: list[Entry], job: str) -> None:
    """Remove leftovers of a killed copy, only in the folders this job stages into.

    And in the staging area's top folder, where fs.probe_unnamed names its test file. Each
    folder is opened beneath the staging area without following a link; one that
    cannot be (missing, a link on the way) holds nothing of ours.
    """
    removed = 0
    for parent in sorted({"", *(split_rel(e.path)[0] for e in entries)}):
        if parent == "":
            removed += remove_leftovers(stager.staging_fd, job)
            continue
        try:
            dir_fd = fs.open_dir(stager.staging_fd, parent)
        except OSError:
            continue
        try:
            removed += remove_leftovers(dir_fd, job)
        finally:
            os.close(dir_fd)
    if removed:
        print(f"stage: removed {removed} temporary files left by an interrupted copy", flush=True)


def copy_all(stager: Stager, entries: list[Entry], job_fd: int, parallel: int) -> None:
    """Stage every entry on `parallel` threads, saving progress every PROGRESS_EVERY."""
    with ThreadPoolExecutor(parallel, thread_name_prefix="stage") as pool:
        stager.group_files = group_size(parallel + 1, descriptor_reserve(parallel))
        futures: set[Future[None]] = {pool.submit(stager.run_chunk, c) for c in chunks(entries)}
        last = time.monotonic()
        while futures:
            finished, futures = wait(futures, timeout=PROGRESS_EVERY, return_when=FIRST_COMPLETED)
            for f in finished:
                exc = f.exception()
                if exc is not None:  # a bug, not a file problem: stop and say so
                    stager.errors.append(f"internal error: {exc!r}")
                    stager.abort.set()
            if time.monotonic() - last >= PROGRESS_EVERY:
                stager.flush_log()
                stager.save(job_fd)
                last = time.monotonic()
    stager.flush_rest()
    stager.flush_log()
    if not stager.errors:
        try:
            stager.flush_names()
        except OSError as e:
            stager.errors.append(f"staging area: {e.strerror}")
        except TargetError as e:
            stager.errors.append(str(e))


def run(job_dir: Path) -> int:
    """Stage the job's manifest; return the exit status."""
    job = os.environ.get("JOBNAME") or job_dir.name
    # the job folder is user input: its files are read and written through this
    # descriptor only, never following a link (batchingest.fs)
    job_fd = fs.open_root(job_dir)
    try:
        return stage_job(job, job_fd)
    finally:
        os.close(job_fd)


def stage_job(job: str, job_fd: int) -> int:
    try:
        cfg = Settings.from_env()
        entries, unknown = load_entries(job_fd, cfg)
        progress = Progress(
            files_total=len(entries) + len(unknown),
            bytes_total=sum(e.size for e in (*entries, *unknown)),
        )
        write_progress(job_fd, progress)
    except StagingError as e:
        record_error(job_fd, str(e))
        return 2
    except OSError as e:
        record_error(job_fd, f"{PROGRESS} cannot be written: {e.strerror or e}")
        return 2
    try:
        stager = Stager(cfg.archive, cfg.staging, job, cfg.verify, progress)
    except StagingError as e:  # an area that cannot be opened (open_area)
        record_error(job_fd, str(e))
        return 2
    try:
        return stage_files(stager, cfg, entries, unknown, job_fd)
    finally:
        stager.close()


def stage_files(
    stager: Stager, cfg: Settings, entries: list[Entry], unknown: list[Entry], job_fd: int
) -> int:
    job, progress = stager.job, stager.progress
    started = time.monotonic()
    print(
        f"stage: {progress.files_total} files, {progress.bytes_total} bytes, from "
        f"{cfg.archive} to {cfg.staging}, {cfg.parallel} at a time"
        f"{', verifying SHA-256' if cfg.verify else ''}",
        flush=True,
    )
    for entry in unknown:
        stager.problem(f"id {entry.id[:300]!r}: not in the catalog")
    sweep(stager, entries, job)
    copy_all(stager, entries, job_fd, cfg.parallel)
    elapsed = time.monotonic() - started
    if stager.errors:
        first = stager.errors[0]
        more = f" (and {len(stager.errors) - 1} more)" if len(stager.errors) > 1 else ""
        progress.error = f"{first}{more}"
        write_progress(job_fd, progress, durable=True)
        staged = f"{progress.files_staged} of {progress.files_total} files staged"
        print(f"ERROR stage failed after {elapsed:.1f}s: {progress.error}; {staged}", flush=True)
        return 1
    write_progress(job_fd, progress, durable=True)
    print(
        f"stage: done in {elapsed:.1f}s: {stager.copied} copied, {stager.skipped} already "
        f"staged, {progress.bytes_staged} bytes",
        flush=True,
    )
    return 0


def main() -> None:
    job_dir = Path(os.environ.get("JOBPATH") or os.getcwd())
    sys.exit(run(job_dir))


if __name__ == "__main__":
    main()
