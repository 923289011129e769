"""The job names of large state folders, kept current by inotify instead of rescanned.

Listing a folder of 100,000 entries costs about 60 ms of CPU here (getdents and one
Python object per entry) and sorting them 20 ms more; a folder that keeps changing
(success/ while jobs finish) would cost that at every listing and every `/metrics`
scrape. The link count of a folder does not help: ext4 stops counting subfolders past
65,000 (st_nlink is then 1), and hidden or badly named folders are no jobs.

So once a state folder is large, the store watches the state folders with one inotify
instance: each folder is opened beneath the root (never through a link) and watched
through that descriptor, *then* scanned once, and every event since the watch began is
applied to the scan. The kernel queues an event before the rename or mkdir that caused
it returns, so reading the queued events at the moment of a listing makes it exact, for
a hand-made `mv` as for the service's own moves: there is no delay. An event only adds
or removes the one name it carries, and the last event of a name is its state now, so
events that the scan already saw are harmless.

When the events cannot be trusted (the kernel's queue overflowed, a state folder itself
was moved or removed), everything is scanned again. Where inotify does not see every
change (a root shared between machines: NFS and the like) or cannot be had (the user's
inotify instances are all taken), the store keeps scanning instead (Store.job_names).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable

from inotify_simple import Event, INotify, flags

from batchingest import fs

_ADDED = flags.CREATE | flags.MOVED_TO
_GONE = flags.DELETE | flags.MOVED_FROM
_BROKEN = flags.DELETE_SELF | flags.MOVE_SELF | flags.UNMOUNT | flags.Q_OVERFLOW | flags.IGNORED
_MASK = _ADDED | _GONE | flags.DELETE_SELF | flags.MOVE_SELF | flags.ONLYDIR
# Past this many changed names since the last sorted listing, sorting the whole set
# again is cheaper than inserting each name into a copy of the old list.
_RESORT_AFTER = 2_000


class Unavailable(OSError):
    """No inotify instance or watch could be had: the caller keeps scanning."""


# How many listings back the changes are kept (Watched.changes)
_KEEP_CHANGES = 64


class Names(list[str]):
    """A sorted listing; its version tells Watched.changes which listing it was."""

    version = 0


class _Folder:
    __slots__ = ("log", "names", "pending", "sorted")

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.sorted = Names(sorted(names))
        self.pending: dict[str, bool] = {}  # name -> present, since `sorted` was made
        # (version, changes that made it from the one before), the latest last
        self.log: deque[tuple[int, dict[str, bool]]] = deque(maxlen=_KEEP_CHANGES)


class Watched:
    """The names of subfolders that `accept` takes, in each of some folders under a
    root, read at any moment in full and exact. Thread-safe.

    root_fd is the root's descriptor; folders are relative to it. Unavailable if
    inotify cannot be used; close() (or losing the object) gives its descriptor back.
    """

    def __init__(self, root_fd: int, folders: Iterable[str], accept: Callable[[str], bool]):
        self._root_fd = root_fd
        self._accept = accept
        self._lock = threading.Lock()
        try:
            self._inotify = INotify(nonblocking=True)
        except OSError as e:
            raise Unavailable(e.errno, f"inotify: {e.strerror}") from None
        self._closer = weakref.finalize(self, self._inotify.close)
        self._wds: dict[int, str] = {}
        self._folders: dict[str, _Folder] = {}
        try:
            self._watch_all(list(folders))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._closer()

    def _watch_all(self, folders: list[str]) -> None:
        """Watch each folder (through a descriptor opened beneath the root), then scan it."""
        for wd in self._wds:
            # EINVAL: the kernel dropped the watch already (its folder went)
            with contextlib.suppress(OSError):
                self._inotify.rm_watch(wd)
        # versions go on across a rescan, with no changes known from before it
        versions = {name: f.sorted.version + 1 for name, f in self._folders.items()}
        self._wds, self._folders = {}, {}
        for folder in folders:
            dir_fd = fs.open_dir(self._root_fd, folder)
            try:
                magic = f"/proc/self/fd/{dir_fd}".encode()
                try:
                    wd = self._inotify.add_watch(magic, _MASK)
                except OSError as e:
                    raise Unavailable(e.errno, f"inotify watch: {e.strerror}") from None
                self._wds[wd] = folder
                self._folders[folder] = _Folder(self._scan(dir_fd))
                self._folders[folder].sorted.version = versions.get(folder, 0)
            finally:
                os.close(dir_fd)

    def _scan(self, dir_fd: int) -> set[str]:
        with os.scandir(dir_fd) as it:
            return {e.name for e in it if self._accept(e.name) and e.is_dir(follow_symlinks=False)}

    def _drain(self) -> None:
        """Apply every queued event; scan everything again if they cannot be trusted."""
        broken = False
        while events := self._inotify.read(timeout=0):
            broken |= self._apply(events)
        if broken:
            self._watch_all(list(self._folders))

    def _apply(self, events: list[Event]) -> bool:
        """Apply events read at once; True if one says the events cannot be trusted."""
        broken = False
        for wd, mask, _, name in events:
            if mask & _BROKEN:
                # IN_IGNORED of a watch we removed ourselves (a rescan) is expected
                broken |= wd == -1 or wd in self._wds
                continue
            folder = self._folders.get(self._wds.get(wd, ""))
            if folder is None or not (mask & flags.ISDIR) or not self._accept(name):
                continue
            present = bool(mask & _ADDED)
            (folder.names.add if present else folder.names.discard)(name)
            folder.pending[name] = present
        return broken

    def count(self, folder: str) -> int:
        with self._lock:
            self._drain()
            return len(self._folders[folder].names)

    def names(self, folder: str) -> Names:
        """The folder's names, sorted: the same list object while nothing changed.

        Callers share the list, so it is never changed: a change makes a new one.
        """
        with self._lock:
            self._drain()
            f = self._folders[folder]
            if f.pending:
                new = Names(sorted(f.names) if len(f.pending) >= _RESORT_AFTER else f.sorted)
                if len(f.pending) < _RESORT_AFTER:
                    _update(new, f.pending)
                new.version = f.sorted.version + 1
                f.log.append((new.version, f.pending))
                f.sorted, f.pending = new, {}
            return f.sorted

    def changes(self, folder: str, old: Names, new: Names) -> dict[str, bool] | None:
        """The names added (True) or removed (False) from listing old to listing new,
        both got from names(folder); None when that is no longer known (too long ago,
        or the folders were listed again since)."""
        with self._lock:
            f = self._folders.get(folder)
            steps = [] if f is None else [c for v, c in f.log if old.version < v <= new.version]
            if f is None or len(steps) != new.version - old.version:
                return None
            merged: dict[str, bool] = {}
            for step in steps:
                merged.update(step)
            return merged


def _update(new: list[str], changes: dict[str, bool]) -> None:
    """Add or remove names in the sorted list new as changes say."""
    for name, present in changes.items():
        i = bisect.bisect_left(new, name)
        there = i < len(new) and new[i] == name
        if present and not there:
            new.insert(i, name)
        elif not present and there:
            del new[i]
