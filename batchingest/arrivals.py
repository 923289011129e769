"""Arrivals in one folder through inotify: what wakes the processor for queue/.

The kernel is asked for arrivals only (a name created in the folder or moved into it),
so jobs leaving queue/ (one claim per job) wake nobody, and one read takes whatever
came meanwhile. The descriptor is non-blocking and meant for an event loop's reader.
(watchfiles, used before, reported every change and polled for them every millisecond
in a thread that took the GIL at each step: a sixth of the processor's CPU per job.)
The binding itself (the descriptor, its watches, events read and parsed) is
inotify_simple's, as for batchingest.listings; what an event means here is this module's.
"""

from __future__ import annotations

import os

from inotify_simple import INotify, flags

# the folder itself went away or was moved: its watch tells nothing more
_GONE = flags.DELETE_SELF | flags.MOVE_SELF | flags.IGNORED
# names created or moved in, and the folder's own end; never through a link
_MASK = (
    flags.CREATE
    | flags.MOVED_TO
    | flags.DELETE_SELF
    | flags.MOVE_SELF
    | flags.ONLYDIR
    | flags.DONT_FOLLOW
)


class Arrivals:
    """An inotify descriptor watching one folder for names created or moved in."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self._inotify = INotify(nonblocking=True)
        try:
            self._inotify.add_watch(folder, _MASK)
        except BaseException:
            self._inotify.close()
            raise
        self.fd: int = self._inotify.fileno()
        self.gone = False  # the folder was removed or moved: nothing more will come

    def drain(self) -> bool:
        """Read every event waiting; whether any was an arrival (or may have been)."""
        arrived = False
        while events := self._inotify.read(timeout=0):
            for event in events:
                if event.mask & _GONE:
                    self.gone = True
                else:  # an arrival, or an overflow that may have hidden some
                    arrived = True
        return arrived

    def close(self) -> None:
        self._inotify.close()
        self.fd = -1
