"""One upload: a request body becoming a file in a job folder, whole, or not at all.

The body goes to an *unnamed* file (`O_TMPFILE`) in the job folder, so an upload cut
off by a client, a full disk or `kill -9` leaves nothing at all. Where unnamed files are
not available (NFS, some container setups) it goes to a hidden `.upload-<random>` in the
job's own folder instead, held with `flock` while in use; `sweep_uploads` removes the
leftovers of a killed service. At commit, under the job's lock, the file gets a hidden
name (linkat) if it had none and is renamed to its real name.

Everything goes through the job folder's descriptor (batchingest.fs): the path is
checked while it is opened, never reused as a string, so a folder swapped for a
symbolic link during the upload cannot send the file anywhere else.
`BATCHINGEST_UPLOAD_UNNAMED=0` forces named temporaries.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import stat
import time

from batchingest import fs, jobfile
from batchingest.api.errors import ApiError
from batchingest.store import Hold, Job, Store

log = logging.getLogger("batchingest.api")

UPLOAD_PREFIX = ".upload-"
# an uploaded JOB is read back to check it; the processor reads it whole too
_SAFE = os.O_CLOEXEC | os.O_NOFOLLOW
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
# None: not tried yet; False: use named temporaries (also after a failed probe)
_unnamed: bool | None = (
    None
    if _O_TMPFILE
    and os.environ.get("BATCHINGEST_UPLOAD_UNNAMED", "1").lower() not in ("0", "false", "no")
    else False
)


def _temp_name() -> str:
    return f"{UPLOAD_PREFIX}{secrets.token_hex(8)}"


def _busy(name: str, state: str) -> ApiError:
    return ApiError(
        409, "JobBusy", f"job {name!r} is in {state}/: its files cannot be changed until it leaves"
    )


def hold_unqueued(store: Store, job: Job, job_fd: int) -> Hold:
    """Hold the job (see Store.hold_unqueued) and check it is the folder job_fd is.

    The job may have been queued, moved or deleted and made again since job_fd was
    opened: the lock keeps processors and deletes away, and the held folder must be
    the one this request works in. Returns the hold (call .release()).
    """
    hold = store.hold_unqueued(job.name)
    if hold is None:
        now = store.find(job.name)
        raise _busy(job.name, now.state if now is not None else "processing")
    try:
        here = os.stat(hold.path, follow_symlinks=False)
        if not fs.same_inode(here, os.fstat(job_fd)):
            raise ApiError(409, "Conflict", f"job {job.name!r} was replaced during the request")
    except BaseException:
        hold.release()
        raise
    return hold


def check_place(job_fd: int, parts: list[str]) -> None:
    """Refuse early what a commit would refuse: a file or link among the folders, a
    folder or link at the name. Missing folders are fine (made at commit)."""
    parent = job_fd
    if len(parts) > 1:
        try:
            parent = fs.open_dir(job_fd, "/".join(parts[:-1]))
        except FileNotFoundError:
            return
        except NotADirectoryError:
            raise ApiError(409, "NotADirectory", "a parent of this path is a file") from None
    try:
        _refuse_existing(parent, parts)
    finally:
        if parent != job_fd:
            os.close(parent)


def _refuse_existing(parent: int, parts: list[str]) -> os.stat_result | None:
    """lstat of the last segment in parent; 409 for a folder, 400 for a link."""
    try:
        st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        raise ApiError(409, "IsADirectory", f"{'/'.join(parts)!r} is a folder")
    if stat.S_ISLNK(st.st_mode):
        raise fs.UnsafePath(
            errno.ELOOP, "a symbolic link is in the way (links are never followed)", "/".join(parts)
        )
    return st


def _unnamed_file(job_fd: int) -> int:
    """An unnamed file in the job folder, or -1 where that cannot work."""
    global _unnamed
    if _unnamed is False:
        return -1
    try:
        fd = os.open(".", _O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644, dir_fd=job_fd)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            return -1  # this file system has none (NFS): named, this time
        raise
    if _unnamed is None:
        _unnamed = _probe_link(job_fd)
        if not _unnamed:
            log.info("uploads: unnamed files cannot be linked here; using hidden named files")
            os.close(fd)
            return -1
    return fd


def _probe_link(job_fd: int) -> bool:
    """Can an unnamed file be given a name (linkat through /proc/self/fd)? Tried once."""
    fd = os.open(".", _O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644, dir_fd=job_fd)
    name = _temp_name()
    try:
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=job_fd, follow_symlinks=True)
    except OSError:
        return False
    finally:
        os.close(fd)
    os.unlink(name, dir_fd=job_fd)
    return True


class Upload:
    """One upload into a job: open(), write to .fd, check_job_file(), commit(), close().

    close() always runs: after a commit it only closes the file; otherwise it removes the
    named temporary (an unnamed one vanishes with its descriptor).
    """

    def __init__(self, store: Store, job: Job, job_fd: int, parts: list[str]) -> None:
        self.store = store
        self.job = job
        self.job_fd = job_fd
        self.parts = parts
        self.rel = "/".join(parts)
        self.fd = -1
        self.temp: str | None = None  # the hidden name of the file, while it has one

    def open(self) -> None:
        check_place(self.job_fd, self.parts)
        try:
            self.fd = _unnamed_file(self.job_fd)
            if self.fd < 0:
                self.temp = _temp_name()
                flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _SAFE
                self.fd = os.open(self.temp, flags, 0o644, dir_fd=self.job_fd)
        except OSError:
            self.temp = None
            if os.fstat(self.job_fd).st_nlink == 0:  # ENOENT, or EPERM for O_TMPFILE
                raise ApiError(
                    404, "JobNotFound", f"job {self.job.name!r} was deleted meanwhile"
                ) from None
            raise
        # held while in use: a sweep removes only temporaries nobody holds
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def check_job_file(self) -> None:
        """An uploaded top-level JOB must be one the processor can read (400 if not)."""
        if self.rel != jobfile.JOB_FILE:
            return
        os.lseek(self.fd, 0, os.SEEK_SET)
        try:
            jobfile.parse(fs.read_fd(self.fd, jobfile.JOB_LIMIT, self.rel))
        except fs.TooLarge as e:
            raise ApiError(400, "InvalidJobFile", f"JOB is {e.strerror}") from None
        except jobfile.JobFileError as e:
            raise ApiError(400, "InvalidJobFile", str(e)) from None

    def commit(self) -> bool:
        """Give the file its real name, under the job's lock; True if it is new."""
        hold = hold_unqueued(self.store, self.job, self.job_fd)
        try:
            made: list[str] = []
            try:
                parent = fs.make_dirs(self.job_fd, self.parts[:-1], made)
            except NotADirectoryError:
                raise ApiError(409, "NotADirectory", "a parent of this path is a file") from None
            try:
                return self._rename_into(parent)
            except BaseException:
                remove_made(self.job_fd, made)
                raise
            finally:
                os.close(parent)
        finally:
            hold.release()

    def _rename_into(self, parent: int) -> bool:
        existed = _refuse_existing(parent, self.parts) is not None
        if self.temp is None:
            name = _temp_name()
            os.link(f"/proc/self/fd/{self.fd}", name, dst_dir_fd=self.job_fd, follow_symlinks=True)
            self.temp = name
        try:
            os.rename(self.temp, self.parts[-1], src_dir_fd=self.job_fd, dst_dir_fd=parent)
        except IsADirectoryError:
            raise ApiError(409, "IsADirectory", f"{self.rel!r} is a folder") from None
        self.temp = None
        return not existed

    def close(self) -> None:
        if self.temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp, dir_fd=self.job_fd)
            self.temp = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def remove_made(job_fd: int, made: list[str]) -> None:
    """Remove the folders a failed upload created, deepest first, so nothing changed.

    rmdir removes only empty folders: one that another upload put a file in meanwhile
    stays, and so do its parents. Folders that existed before are never in made.
    """
    for rel in sorted(made, key=lambda r: r.count("/"), reverse=True):
        head, _, name = rel.rpartition("/")
        with contextlib.suppress(OSError):
            parent = fs.open_dir(job_fd, head) if head else job_fd
            try:
                os.rmdir(name, dir_fd=parent)
            finally:
                if parent != job_fd:
                    os.close(parent)


def sweep_uploads(store: Store, min_age: float = 2.0) -> int:
    """Remove the named upload temporaries a killed service left in job folders.

    Looks in the top folder of every job in data/, success/ and error/ (where uploads
    go); a temporary some live upload holds (flock), or one younger than min_age
    seconds (just created, not locked yet), is kept. Returns how many were removed.
    """
    removed = 0
    for job in store.each_job(("data", "success", "error")):
        try:
            job_fd = store.open_job(job)
        except OSError:
            continue  # moved or replaced meanwhile
        try:
            for entry in fs.entries(job_fd, hidden=True):
                if entry.name.startswith(UPLOAD_PREFIX) and entry.is_file:
                    removed += _remove_stale(job_fd, entry.name, min_age)
        finally:
            os.close(job_fd)
    if removed:
        log.info("removed %d upload temporaries left by an earlier run", removed)
    return removed


def _remove_stale(job_fd: int, name: str, min_age: float) -> int:
    try:
        fd = fs.open_regular(job_fd, name)
    except OSError:
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return 0  # a live upload's
        if time.time() - os.fstat(fd).st_mtime < min_age:
            return 0
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=job_fd)
            return 1
        return 0
    finally:
        os.close(fd)
