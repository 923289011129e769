"""The copy engine shared by the built-in `stage` and `transfer` tasks.

Descriptor to descriptor only: callers open both sides (stage by its checked real paths,
transfer beneath endpoint folders through batchingest.fs), so nothing here resolves a
path. The kernel copies (copy_file_range, else sendfile, else read/write), large files in
pieces on several threads with each piece's writeback started at once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import resource
from concurrent.futures import ThreadPoolExecutor, wait

from batchingest import fs

CHUNK = 1 << 30
PIECE = 64 << 20  # large files are copied in pieces this big, several at once
LARGE = 8 << 20  # files this big are copied in pieces and flushed on their own
# Small copies flushed with one syncfs, then named. Each waits with its descriptor open
# (an unnamed file lives only as long as it), so the descriptor limit may make a group
# smaller (group_size).
GROUP_FILES = 4096
GROUP_BYTES = 1 << 30

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


def copy_pieces(pool: ThreadPoolExecutor, src: int, dst: int, size: int) -> int:
    """Copy a large file as PIECE-sized pieces on several threads (cp uses one)."""
    futures = [pool.submit(copy_range, src, dst, off, min(PIECE, size - off))
               for off in range(0, size, PIECE)]  # fmt: skip
    wait(futures)  # every piece must be done with the descriptors before anyone closes them
    copied = 0
    for f in futures:
        copied += f.result()
    return copied


def sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def group_size(holders: int) -> int:
    """Small copies per group such that the copies held open fit the descriptor limit.

    holders: how many groups may be open at once (a thread may hold a full one while
    another is flushed). Raises the soft limit as far as allowed and sizes groups to it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = holders * GROUP_FILES + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return GROUP_FILES
    return max(1, min(GROUP_FILES, (soft - 256) // holders))
