"""Leases: which host holds a job, readable by every host sharing the jobs root.

`flock` on a job's `.lock` tells a live holder from a dead one only where locks are
shared between the machines mounting the root (NFS with working locks, Lustre with
`-o flock`, CephFS). Many shared file systems keep locks local to each client (NFS with
`local_lock=all`, Lustre without `-o flock`, most FUSE network file systems), and there
another host's live holder looks dead. So a holder also records a lease, the hidden file
`.lease` in the job folder (it moves with the folder). On a local file system no other
host can see the root and the lock alone holds the job: no lease is made there
(Store.leases; --shared-root for a local root other machines mount too).

    {"Host", "Boot", "Pid", "Token", "Claimed", "Renewed", "Expires"}

- It is created with O_EXCL *before* the job is renamed into processing/, so two hosts
  claiming one job cannot both hold it, and every job a live service holds has one.
- The holder rewrites it in place every --lease-renew seconds through its open file; the
  file's mtime, set by the file system, is the proof of life. Time is judged only by the
  shared file system: "now" is the mtime of a probe file just written in the root
  (`shared_now`), so the hosts' clocks never meet.
- Another host takes a lease over only once it is older than --lease-timeout, and the
  take-over starts with a rename of `.lease` onto a fresh name: only one host can win it,
  and the winner checks that what it renamed is the very file it judged, unrenewed,
  before it puts its own lease in place (`acquire`). On the holder's own host a dead
  holder is known at once (its boot id and a pid that is gone).
- A holder checks that `.lease` is still its own (its inode) before every change it
  makes to the job, and after every renewal; one that lost it (it was frozen, its mount
  hung) stops its task and touches nothing of the job.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from batchingest import fs

log = logging.getLogger("batchingest.lease")

LEASE = ".lease"
DEFAULT_TIMEOUT = 60.0
_LIMIT = 4096
_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
# A full disk: a lease's content cannot be written, but its mtime can still be set.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


# Tokens of the leases this process holds now: one of ours not among them was left behind
# (its removal failed, say for want of descriptors) and holds nothing.
_LIVE: set[str] = set()


class LeaseUnusable(OSError):
    """`.lease` in the job is a link, a folder or a special file: the job cannot be held."""


@dataclass(frozen=True)
class Owner:
    """A holder: host (--host-id), the host's boot id and the service's pid."""

    host: str
    boot: str
    pid: int

    @classmethod
    def here(cls, host: str = "") -> Owner:
        return cls(host or socket.gethostname(), boot_id(), os.getpid())


def boot_id() -> str:
    """This boot of this machine: a pid only means something within one boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _stamp(t: float) -> str:
    """Fixed width, so a renewal rewrites the lease in place with the same length."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Found:
    """A lease read from a job folder. owner None: unreadable (being written, or junk)."""

    owner: Owner | None
    token: str
    st: os.stat_result


def read(dir_fd: int) -> Found | None:
    """The job's lease, or None if it has none. LeaseUnusable if it is not a regular file."""
    try:
        fd = fs.open_regular(dir_fd, LEASE)
    except FileNotFoundError:
        return None
    except (fs.UnsafePath, fs.NotRegular) as e:
        raise LeaseUnusable(errno.EINVAL, f"its {LEASE} is not a regular file") from e
    try:
        st = os.fstat(fd)
        data = fs.read_fd(fd, _LIMIT, LEASE)
    except fs.TooLarge:
        return Found(None, "", os.fstat(fd))
    finally:
        os.close(fd)
    try:
        doc = json.loads(data)
        owner = Owner(str(doc["Host"]), str(doc["Boot"]), int(doc["Pid"]))
        return Found(owner, str(doc["Token"]), st)
    except (ValueError, KeyError, TypeError):
        return Found(None, "", st)


CLOCK_PREFIX = ".clock-"


def host_label(host: str) -> str:
    """A host id (Owner.host) as it is in the names of a host's files in the root."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", host)[:100]


def clock_name(host: str) -> str:
    """The probe file of shared_now in the jobs root: one per host."""
    return CLOCK_PREFIX + host_label(host)


def shared_now(root_fd: int, host: str) -> float:
    """ "Now" on the shared file system's clock: the mtime of a probe file just written."""
    name = clock_name(host)
    fd = os.open(name, os.O_RDWR | os.O_CREAT | _FLAGS, 0o644, dir_fd=root_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{name} in the jobs root is not a regular file")
        os.pwrite(fd, b"now\n", 0)
        os.fsync(fd)  # on NFS the server stamps the write: its clock, not ours
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid exists on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale(found: Found, me: Owner, now: Callable[[], float], timeout: float) -> str | None:
    """Why this lease no longer holds its job, or None while it does."""
    owner = found.owner
    if owner is not None and owner.host == me.host:
        if owner.boot != me.boot:
            return f"its host {owner.host} restarted"
        if owner.pid == os.getpid() and found.token not in _LIVE:
            return "left behind by this process"
        if not pid_alive(owner.pid):
            return "its processor is gone"
        # a live pid may be a reused one: only the lease's age can tell then
    age = now() - found.st.st_mtime
    if age > timeout:
        host = owner.host if owner is not None else "unknown host"
        return f"its lease ({host}) was not renewed for {age:.0f}s"
    return None


class Held:
    """A lease this process holds: the open `.lease` file, rewritten in place to renew."""

    def __init__(
        self, fd: int, owner: Owner, token: str, timeout: float, local: bool = False
    ) -> None:
        self.fd = fd
        self.owner = owner
        self.token = token
        self.timeout = timeout
        self.claimed = time.time()
        self.lost = False
        # on a local file system a name's lookup is never stale: is_ours is one lstat
        self.local = local
        self._st = os.fstat(fd)
        _LIVE.add(token)

    def content(self) -> bytes:
        now = time.time()
        doc = {"Host": self.owner.host, "Boot": self.owner.boot, "Pid": self.owner.pid,
               "Token": self.token, "Claimed": _stamp(self.claimed), "Renewed": _stamp(now),
               "Expires": _stamp(now + self.timeout)}  # fmt: skip
        return json.dumps(doc).encode() + b"\n"

    def renew(self, dir_fd: int) -> bool:
        """Stamp the lease with a fresh mtime, then check it is still ours.

        In this order a take-over racing with us is always seen: either it finds the
        fresh mtime and backs off, or it renamed the file away before we look.
        """
        try:
            os.pwrite(self.fd, self.content(), 0)
            os.fsync(self.fd)
        except OSError as e:
            if e.errno not in _NO_SPACE:
                raise
            os.utime(self.fd)  # the mtime is what counts; on NFS the server sets it
        return self.is_ours(dir_fd)

    def is_ours(self, dir_fd: int) -> bool:
        """Whether `.lease` in the job is still this one; once not, never again.

        Compared by inode: while our descriptor keeps the file open its inode number
        cannot be given to another file. Opened rather than stat-ed, since an open
        makes NFS look the name up again (close-to-open) where a stat may be cached.
        Only a missing or different `.lease` is a loss; another error (a sick mount) is
        raised, since it proves nothing. On a local file system (`local`) an lstat of
        the name tells the same at a fifth of the system calls. Elsewhere, with no
        descriptor left to open it with, it is stat-ed too: jobs held while the process
        is out of descriptors could otherwise never be moved on and free theirs (their
        renewals still stamp it, through our own descriptor, so no other host takes it
        over meanwhile).
        """
        if not self.lost and self.local:
            self._check_by_lstat(dir_fd)
        elif not self.lost:
            try:
                fd = fs.open_regular(dir_fd, LEASE)
            except (FileNotFoundError, fs.UnsafePath, fs.NotRegular):
                self.lost = True
                return False
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                self._check_by_lstat(dir_fd)
                return not self.lost
            try:
                self.lost = self.fd < 0 or not fs.same_inode(os.fstat(fd), os.fstat(self.fd))
            finally:
                os.close(fd)
        return not self.lost

    def _check_by_lstat(self, dir_fd: int) -> None:
        st = fs.lstat(dir_fd, LEASE)
        self.lost = self.fd < 0 or st is None or not fs.same_inode(st, self._st)

    def drop(self, dir_fd: int) -> None:
        """Remove `.lease` if it is still ours, and close it.

        When that cannot be told (an error) it stays: a lease left behind only delays
        the job's next claim by --lease-timeout, one removed wrongly could be another's.
        """
        with contextlib.suppress(OSError):
            if dir_fd >= 0 and self.fd >= 0 and self.is_ours(dir_fd):
                os.unlink(LEASE, dir_fd=dir_fd)
        self.close()

    def close(self) -> None:
        _LIVE.discard(self.token)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _create(dir_fd: int, me: Owner, timeout: float, local: bool) -> Held:
    fd = os.open(LEASE, os.O_RDWR | os.O_CREAT | os.O_EXCL | _FLAGS, 0o644, dir_fd=dir_fd)
    try:
        held = Held(fd, me, secrets.token_hex(8), timeout, local)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(LEASE, dir_fd=dir_fd)
        raise
    try:
        # no fsync: a lease emptied by a power cut reads as unreadable and is judged by
        # its mtime alone, and one fsync less per job is measurable on small jobs
        try:
            fs.write_all(fd, held.content())
        except OSError as e:
            if e.errno not in _NO_SPACE:
                raise
            # a full disk: the empty lease is judged by its mtime alone (no fast path)
    except BaseException:
        held.close()
        with contextlib.suppress(OSError):
            os.unlink(LEASE, dir_fd=dir_fd)
        raise
    return held


def _take_away(dir_fd: int, found: Found) -> bool:
    """Rename the judged lease away: True only if we won and it was not renewed meanwhile.

    The rename can succeed for one host only. If the file renamed is not the one judged
    (replaced), or its mtime moved (renewed), its holder lives: it is put back.
    """
    aside = f"{LEASE}.taken-{secrets.token_hex(6)}"
    try:
        os.rename(LEASE, aside, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except FileNotFoundError:
        return False  # another host won
    st = os.stat(aside, dir_fd=dir_fd, follow_symlinks=False)
    if fs.same_inode(st, found.st) and st.st_mtime_ns == found.st.st_mtime_ns:
        os.unlink(aside, dir_fd=dir_fd)
        return True
    try:
        fs.rename_noreplace(aside, LEASE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except FileExistsError:  # a newer holder is in place: the one we moved has lost
        os.unlink(aside, dir_fd=dir_fd)
    return False


@dataclass
class Acquired:
    held: Held
    broke: str | None  # why the lease found there no longer held the job, if there was one


def acquire(
    dir_fd: int, me: Owner, timeout: float, now: Callable[[], float], local: bool = False
) -> Acquired | None:
    """Put our lease in the job folder; None while another live lease holds it.

    A lease found there is taken over only when `stale` says so, through `_take_away`.
    LeaseUnusable if `.lease` is something other than a regular file. local: the root
    is on a local file system (see shared_fs), where the lease is checked by lstat.
    """
    broke: str | None = None
    for _ in range(3):
        try:
            return Acquired(_create(dir_fd, me, timeout, local), broke)
        except FileExistsError:
            pass
        found = read(dir_fd)
        if found is None:
            continue  # gone meanwhile: try again
        broke = stale(found, me, now, timeout)
        if broke is None or not _take_away(dir_fd, found):
            return None
    return None


class Clock:
    """shared_now, read at most once per round (a recovery scan, a claim)."""

    def __init__(self, root_fd: int, host: str) -> None:
        self._root_fd = root_fd
        self._host = host
        self._now: float | None = None

    def __call__(self) -> float:
        if self._now is None:
            self._now = shared_now(self._root_fd, self._host)
        return self._now


class Renewer:
    """One thread renewing every lease this service holds, every `interval` seconds.

    on_lost(key) is called once for a lease found no longer ours (taken over while this
    host was frozen or cut off): the caller stops the job's task and leaves the job.
    """

    def __init__(self, interval: float, on_lost: Callable[[str], None]) -> None:
        self.interval = interval
        self._on_lost = on_lost
        self._held: dict[str, tuple[int, Held]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batchingest-leases", daemon=True)

    def start(self) -> None:
        """Renew from now on (once; not after stop)."""
        with self._lock:
            if not self._stop.is_set() and self._thread.ident is None:
                self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def add(self, key: str, dir_fd: int, held: Held) -> None:
        with self._lock:
            self._held[key] = (dir_fd, held)

    def remove(self, key: str) -> None:
        with self._lock:
            self._held.pop(key, None)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.renew_all()

    def renew_all(self) -> None:
        with self._lock:
            held = list(self._held.items())
        for key, (dir_fd, lease) in held:
            with self._lock:
                if self._held.get(key, (0, None))[1] is not lease:
                    continue  # finished meanwhile: its descriptors may be closed
                try:
                    ours = lease.renew(dir_fd)
                except OSError as e:  # a sick mount: the next round tries again
                    log.warning("renewing the lease of %s failed: %s", key, e)
                    continue
            if not ours:
                self.remove(key)
                self._on_lost(key)


# statfs(2) f_type of the file systems known to be local to one machine (linux/magic.h;
# ZFS, JFS and bcachefs from their own sources). Any other type counts as shared: a
# shared file system missing from a list (BeeGFS, PanFS, OrangeFS, ...) would otherwise
# get folder locks and no leases, and its machines would not see each other's claims;
# a local one missing costs only leases and polling.
_LOCAL_FS = frozenset({
    0xEF53,  # ext2, ext3, ext4
    0x58465342,  # xfs
    0x9123683E,  # btrfs
    0x01021994,  # tmpfs
    0x858458F6,  # ramfs
    0x2FC12FC1,  # zfs
    0x794C7630,  # overlayfs
    0xF2F52010,  # f2fs
    0xCA451A4E,  # bcachefs
    0x52654973,  # reiserfs
    0x3153464A,  # jfs
})  # fmt: skip

# How the log names the shared file systems it knows; others by their type number.
_SHARED_FS = {
    0x6969: "NFS",
    0x65735546: "a FUSE file system",
    0x00C36400: "CephFS",
    0x0BD00BD0: "Lustre",
    0x47504653: "GPFS",
    0xFF534D42: "SMB",
    0xFE534D42: "SMB",
    0x517B: "SMB",
    0x01021997: "9p",
    0x564C: "NCP",
    0x7461636F: "OCFS2",
    0x01161970: "GFS2",
    0x5346414F: "AFS",
    0x6B414653: "AFS",
    0x73757245: "Coda",
}


def fs_type(path: str | os.PathLike[str]) -> int | None:
    """statfs f_type of the file system holding path; None where it cannot be read."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if libc.statfs(os.fsencode(path), buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def shared_fs(path: str | os.PathLike[str]) -> str | None:
    """The file system holding path as the log names it, if other machines may share
    it; None if it is known to be local to this machine (_LOCAL_FS).

    The one rule for every use (inotify, folder locks, claims without a lease, the
    lease's lstat check): each is right only on a local file system, so one whose type
    is not known to be local, or cannot be read, counts as shared.
    """
    return shared_kind(fs_type(path))


def shared_kind(kind: int | None) -> str | None:
    """shared_fs for a statfs f_type (None: it could not be read)."""
    if kind is None:
        return "a file system whose type cannot be read"
    if kind in _LOCAL_FS:
        return None
    return _SHARED_FS.get(kind, f"a file system of type {kind:#010x}, not known to be local")


def watch_mode(shared: str | None, force_polling: bool) -> str | None:
    """Why queue/ must be polled rather than watched with inotify; None: inotify is fine.

    shared: shared_fs of the jobs root.
    """
    if force_polling:
        return "--force-polling is set"
    if shared is not None:
        return f"the jobs root is on {shared}, where inotify does not see other machines' changes"
    return None
