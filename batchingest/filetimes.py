"""When a folder was made and last changed: statx(2) birth and change times.

`os.stat` has no birth time on Linux before Python 3.15 (`os.statx`), so statx is
called through ctypes where the C library has it (glibc 2.28 and later). The call
never follows a symbolic link: a link is reported as what it is, never its target.

- `created` is the birth time where the file system records one (ext4, XFS, Btrfs,
  tmpfs since Linux 5.x...). Where it does not (NFS and other network file systems,
  or no statx at all) it is the earlier of the folder's mtime and ctime: the folder
  existed by then, so it is the latest the folder can have been made.
- `modified` is the ctime: it changes when the folder is renamed (Linux file systems
  update the ctime of a moved inode), when an entry is added to or removed from it,
  and on chmod/chown; never when a file inside it is only rewritten in place.

Both are kept to the millisecond, the precision the API shows, so a time copied from a
listing into a filter matches the job it came from.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import stat
from dataclasses import dataclass
from datetime import UTC, datetime

_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
_STATX_TYPE = 0x1
_STATX_MTIME = 0x40
_STATX_CTIME = 0x80
_STATX_BTIME = 0x800
_WANT = _STATX_TYPE | _STATX_MTIME | _STATX_CTIME | _STATX_BTIME


class _Stamp(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_int64), ("nsec", ctypes.c_uint32), ("_reserved", ctypes.c_int32)]


class _Statx(ctypes.Structure):
    """struct statx of linux/stat.h, 256 bytes: only the fields read here are named, the
    others are bytes at the offsets the header gives them."""

    _fields_ = [
        ("mask", ctypes.c_uint32),  # offset 0
        ("_blksize_to_gid", ctypes.c_uint8 * 24),
        ("mode", ctypes.c_uint16),  # offset 28
        ("_spare_to_atime", ctypes.c_uint8 * 50),  # spare, ino, size, blocks, masks, atime
        ("btime", _Stamp),  # offset 80
        ("ctime", _Stamp),  # offset 96
        ("mtime", _Stamp),  # offset 112
        ("_rest", ctypes.c_uint8 * 128),
    ]


@dataclass(frozen=True)
class Times:
    """Seconds since the epoch, to the millisecond."""

    created: float
    modified: float
    birth: bool  # whether `created` is the file system's birth time


def _load() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.statx
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_statx = _load()


def _ms(sec: int, nsec: int) -> float:
    return (sec * 1000 + nsec // 1_000_000) / 1000


def _ms_ns(ns: int) -> float:
    return _ms(*divmod(ns, 1_000_000_000))


_AT_EMPTY_PATH = 0x1000


def folder_times(path: str | int) -> Times | None:
    """The times of the folder at path; None if it is gone or is not a folder (a link).

    OSError for anything else (EACCES, EIO).
    """
    if _statx is None:
        return _fallback(path)
    buf = _Statx()
    # a descriptor (an open job folder) is asked directly: no path to resolve again
    where, name, flags = (
        (path, b"", _AT_EMPTY_PATH) if isinstance(path, int)
        else (_AT_FDCWD, os.fsencode(path), _AT_SYMLINK_NOFOLLOW)
    )  # fmt: skip
    if _statx(where, name, flags, _WANT, ctypes.byref(buf)):
        err = ctypes.get_errno()
        if err in (errno.ENOENT, errno.ENOTDIR):  # moved or removed meanwhile
            return None
        if err == errno.ENOSYS:  # a kernel without statx
            return _fallback(path)
        raise OSError(err, os.strerror(err), str(path))
    if not stat.S_ISDIR(buf.mode):
        return None
    c, m = buf.ctime, buf.mtime
    modified = _ms(c.sec, c.nsec)
    if buf.mask & _STATX_BTIME:
        return Times(_ms(buf.btime.sec, buf.btime.nsec), modified, True)
    return Times(min(_ms(m.sec, m.nsec), modified), modified, False)


def _fallback(path: str | int) -> Times | None:
    try:
        st = os.fstat(path) if isinstance(path, int) else os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    ctime, mtime = _ms_ns(st.st_ctime_ns), _ms_ns(st.st_mtime_ns)
    return Times(min(mtime, ctime), ctime, False)


def rfc3339(seconds: float) -> str:
    """RFC 3339 UTC to the millisecond, as the API shows times: 2026-11-23T14:10:48.123Z."""
    ms = round(seconds * 1000)
    return f"{_second(ms // 1000)}.{ms % 1000:03d}Z"


@functools.lru_cache(maxsize=4096)
def _second(seconds: int) -> str:
    # formatting a date costs more than the rest of a job's info: folders share seconds
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


# An inode's birth time never changes: kept by (device, inode), so that the hot path
# (`GET /jobs/{id}`) needs only an fstat, not a statx through ctypes, for a known folder.
_CREATED: dict[tuple[int, int], tuple[float, bool]] = {}


def _fd_times(fd: int, st: os.stat_result) -> Times | None:
    """The times of the folder open as fd, whose fstat is st."""
    if not stat.S_ISDIR(st.st_mode):
        return None
    key = (st.st_dev, st.st_ino)
    created = _CREATED.get(key)
    modified = _ms_ns(st.st_ctime_ns)
    if created is None:
        t = folder_times(fd)
        if t is None:
            return None
        if len(_CREATED) >= 100_000:
            _CREATED.clear()
        _CREATED[key] = (t.created, t.birth)
        return t
    return Times(created[0], modified, created[1])


def job_times(path: str | int) -> dict[str, str | None]:
    """`Created` and `Modified` of a job folder as a job's info shows them (None if gone)."""
    if isinstance(path, int):
        created, modified = shown_times(path)
        return {"Created": created, "Modified": modified}
    t = folder_times(path)
    if t is None:
        return {"Created": None, "Modified": None}
    return {"Created": rfc3339(t.created), "Modified": rfc3339(t.modified)}


# The two texts by (device, inode, ctime): a folder's times change only with its ctime.
_SHOWN: dict[tuple[int, int, int], tuple[str, str]] = {}


def shown_times(fd: int) -> tuple[str | None, str | None]:
    """job_times of an open job folder, as (Created, Modified)."""
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino, st.st_ctime_ns)
    shown = _SHOWN.get(key)
    if shown is None:
        t = _fd_times(fd, st)
        if t is None:
            return None, None
        shown = (rfc3339(t.created), rfc3339(t.modified))
        if len(_SHOWN) >= 10_000:
            _SHOWN.clear()
        _SHOWN[key] = shown
    return shown
