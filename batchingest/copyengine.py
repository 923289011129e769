"""The copy engine shared by the built-in `stage` and `transfer` tasks.

Descriptor to descriptor only: callers open both sides (stage by its checked real paths,
transfer beneath endpoint folders through batchingest.fs), so nothing here resolves a
path. The kernel copies (copy_file_range, else sendfile, else read/write); a large file
is copied in order, STEP at a time, each step's writeback started as soon as it is
copied and the step before waited for (copy_flushing).
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
from collections.abc import Callable

from batchingest import fs

CHUNK = 1 << 30
STEP = 32 << 20  # a large file is copied and written to disk this much at a time
LARGE = 8 << 20  # files this big are copied in steps and flushed on their own
# Small copies flushed with one syncfs, then named. Each waits with its descriptor open
# (an unnamed file lives only as long as it), so the descriptor limit may make a group
# smaller (group_size).
GROUP_FILES = 4096
GROUP_BYTES = 1 << 30
# Descriptors group_size leaves for everything but the waiting copies (stdio, the job
# folder, logs...); a caller holding more (kept folders) passes a larger reserve.
RESERVED_FDS = 256
# Fewer copies than this are fsync-ed one by one: a syncfs would also wait for whatever
# else the file system's other users have written.
FSYNC_UNDER = 8

FALLBACK_ERRNOS = (
    errno.EXDEV,
    errno.ENOSYS,
    errno.EINVAL,
    errno.EOPNOTSUPP,
    errno.ENOTSUP,
    errno.EBADF,
    errno.EPERM,
)


def copy_fd(src: int, dst: int, size: int) -> int:
    """Copy with the kernel's fast paths (copy_file_range, sendfile, else read/write).

    Stops after `size` bytes, saving the end-of-file probe on small files; the caller
    checks that the source did not change meanwhile. Returns the bytes copied.
    """
    done = 0
    method = "copy_file_range" if hasattr(os, "copy_file_range") else "sendfile"
    while size > 0:
        try:
            if method == "copy_file_range":
                n = os.copy_file_range(src, dst, max(CHUNK, size - done))
            elif method == "sendfile":
                n = os.sendfile(dst, src, None, max(CHUNK, size - done))
            else:
                data = os.read(src, 1 << 20)
                n = len(data)
                view = memoryview(data)
                while view:
                    view = view[os.write(dst, view) :]
        except OSError as e:
            if method != "readwrite" and done == 0 and e.errno in FALLBACK_ERRNOS:
                method = "sendfile" if method == "copy_file_range" else "readwrite"
                continue
            raise
        done += n
        if n == 0 or done >= size:
            return done
    return 0


def copy_range(src: int, dst: int, offset: int, length: int) -> int:
    """Copy one piece of a large file at its offset, then start writing it to disk.

    Starting writeback per piece overlaps the disk writes with the rest of the copy, so
    the final fsync has little left to do.
    """
    done = 0
    while done < length:
        n = os.copy_file_range(src, dst, length - done, offset + done, offset + done)
        if n == 0:
            break
        done += n
    fs.sync_file_range(dst, offset, done)  # a hint: errors come at the fsync
    return done


def copy_flushing(
    src: int, dst: int, size: int, after_step: Callable[[int], None] | None = None
) -> int:
    """Copy a large file in order, STEP bytes at a time, writing each step to disk while
    the next one is copied and waiting for the step before it.

    So the copy's dirty pages stay at about two steps (the kernel never throttles it
    against a pile of its own), the disk gets one stream in file order, and the fsync
    that follows has one step left. Measured on a shared virtual disk this beat `cp`
    then fsync, parallel pieces each with their writeback started, and one plain copy.
    after_step(n) runs after each step (progress, cancel checks). Returns the bytes
    copied (fewer than size if the source got shorter). Where copy_file_range is refused
    between these two files from the start (another file system, FUSE, an old kernel),
    the file is copied by copy_fd, which finds what works, as one step.
    """
    done = 0
    before = -1  # where the step before this one starts
    while done < size:
        try:
            n = os.copy_file_range(src, dst, min(STEP, size - done), done, done)
        except OSError as e:
            if done or e.errno not in FALLBACK_ERRNOS:
                raise
            copied = copy_fd(src, dst, size)
            if after_step is not None and copied:
                after_step(copied)
            return copied
        if n == 0:
            break
        fs.sync_file_range(dst, done, n)
        if before >= 0:  # started one step ago: most likely written by now
            fs.sync_file_range(dst, before, done - before, wait=True)
        before = done
        done += n
        if after_step is not None:
            after_step(n)
    return done


def sha256_fd(fd: int) -> str:
    import hashlib  # only for checksums: loading OpenSSL costs every task's start

    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def syncfs_group(copies: int, fd: int) -> bool:
    """Flush the file system holding fd for a group of `copies` copies, if one syncfs is
    worth it; False: fsync each copy instead (too few, or no syncfs on this system)."""
    return copies >= FSYNC_UNDER and fs.syncfs(fd)


def group_size(holders: int, reserve: int = RESERVED_FDS) -> int:
    """Small copies per group such that the copies held open fit the descriptor limit.

    holders: how many groups may be open at once (a thread may hold a full one while
    another is flushed); reserve: descriptors the caller holds besides (folders kept
    open, each thread's source). Raises the soft limit as far as allowed and sizes
    groups to it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = holders * GROUP_FILES + reserve
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return GROUP_FILES
    return max(1, min(GROUP_FILES, (soft - reserve) // holders))
