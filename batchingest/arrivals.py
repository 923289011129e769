"""Arrivals in one folder through inotify: what wakes the processor for queue/.

The kernel is asked for arrivals only (a name created in the folder or moved into it),
so jobs leaving queue/ (one claim per job) wake nobody, and one read takes whatever
came meanwhile. The descriptor is non-blocking and meant for an event loop's reader.
(watchfiles, used before, reported every change and polled for them every millisecond
in a thread that took the GIL at each step: a sixth of the processor's CPU per job.)
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)

IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
# the folder itself went away or was moved: its watch tells nothing more
_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)
_READ = 64 * 1024


class Arrivals:
    """An inotify descriptor watching one folder for names created or moved in."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise _error()
        mask = IN_CREATE | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW
        if _libc.inotify_add_watch(fd, os.fsencode(folder), mask) < 0:
            e = _error()
            os.close(fd)
            raise e
        self.fd = fd
        self.gone = False  # the folder was removed or moved: nothing more will come

    def drain(self) -> bool:
        """Read every event waiting; whether any was an arrival (or may have been)."""
        arrived = False
        while True:
            try:
                data = os.read(self.fd, _READ)
            except BlockingIOError:
                return arrived
            if not data:
                return arrived
            for mask in _masks(data):
                if mask & _GONE:
                    self.gone = True
                else:  # an arrival, or an overflow that may have hidden some
                    arrived = True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _masks(data: bytes) -> list[int]:
    masks, offset = [], 0
    while offset + _HEADER.size <= len(data):
        _, mask, _, length = _HEADER.unpack_from(data, offset)
        masks.append(mask)
        offset += _HEADER.size + length
    return masks


def _error() -> OSError:
    err = ctypes.get_errno() or errno.EIO
    return OSError(err, os.strerror(err))
