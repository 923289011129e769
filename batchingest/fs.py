"""The one access layer for files inside the jobs root and endpoint folders.

Everything inside a job folder (or an endpoint folder) is user input: jobs arrive by
`cp -r`, which keeps symbolic links, and by upload. So service code never opens such a
file by a path string. It opens a *directory descriptor* once and works relative to
it, and every open here

- resolves beneath that directory and never follows a symbolic link: `openat2` with
  RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS where the kernel has it (Linux 5.6+), else one
  `openat(O_NOFOLLOW)` per path component, which refuses the same things (a single
  name is always opened that second way: for one component it is the same check);
- opens with O_NONBLOCK and checks with `fstat` that it got a regular file (or a
  folder) before reading, so a FIFO or a device can neither hang a thread nor be read;
  `open_regular` (and so every read and append) refuses a FIFO or a device from its
  lstat before opening it at all, since the open alone has effects;
- reads at most a stated number of bytes (`read_file(limit=...)`), so a 96 MiB JOB or
  a JOB linked to /dev/zero is a clear error instead of a stall.

A path is checked once, while it is opened; what was opened is then used only through
the descriptors, never by the path string again, so swapping a folder for a link
between a check and a use (a rename exchange) changes nothing.

Names and paths that go to a call here are checked too ('..', '', NUL, 'a/b' where one
name is meant), and removal walks by descriptors without following links. The other
low-level helpers the service needs (renameat2 RENAME_NOREPLACE, atomic replace,
syncfs) live here too, so that this is the only module making raw system calls on
user folders. tests/test_fs.py property-tests all of it against trees of links, FIFOs,
devices and swaps.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import stat
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)

# openat2(2): the syscall number is 437 on every architecture that has it.
_SYS_OPENAT2 = 437 if sys.platform.startswith("linux") else None
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RESOLVE = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_renameat2 = getattr(_libc, "renameat2", None)
_syncfs = getattr(_libc, "syncfs", None)
_syncfs_works = True
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1

# Flags every open of user content carries.
_SAFE = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
# A folder only looked in (fstatat, openat beneath it) needs search permission, not read
# (a 0711 folder): O_PATH gives such a descriptor. Never for a folder that is listed or
# fsync-ed: either is EBADF on it.
_O_PATH = getattr(os, "O_PATH", 0)
LOOKUP = (_O_PATH or os.O_RDONLY) | os.O_DIRECTORY


class UnsafePath(OSError):
    """A path leads through a symbolic link, out of its folder, or is malformed."""


class NotRegular(OSError):
    """The name exists but is not a regular file (a folder, FIFO, device, socket, link)."""


class TooLarge(OSError):
    """The file is bigger than the limit this kind of file is read with."""


def _errno_error(err: int, name: str) -> OSError:
    if err == errno.ELOOP:
        return UnsafePath(err, "a symbolic link is in the way (links are never followed)", name)
    if err == errno.EXDEV:
        return UnsafePath(err, "the path leads outside its folder", name)
    return OSError(err, os.strerror(err), name)


_openat2_works: bool | None = None if _SYS_OPENAT2 is not None else False


_TMPFILE = getattr(os, "O_TMPFILE", 0)
# open_how structures by (flags, mode), built once: building one costs more than the call
_HOWS: dict[tuple[int, int], tuple[object, int]] = {}


def _how(flags: int, mode: int) -> tuple[object, int]:
    found = _HOWS.get((flags, mode))
    if found is None:
        # openat2 refuses a mode without O_CREAT/O_TMPFILE; O_TMPFILE includes the
        # O_DIRECTORY bit, so it must match whole or every folder open would carry a mode
        creates = bool(flags & os.O_CREAT) or (_TMPFILE and flags & _TMPFILE == _TMPFILE)
        how = _OpenHow(flags, mode if creates else 0, _RESOLVE)
        found = (ctypes.byref(how), ctypes.sizeof(how))
        if len(_HOWS) < 64:
            _HOWS[(flags, mode)] = found
    return found


def _openat2(dir_fd: int, rel: str, flags: int, mode: int) -> int | None:
    """openat2 beneath dir_fd without links; None where the kernel lacks the call."""
    global _openat2_works
    if _openat2_works is False:
        return None
    how, size = _how(flags, mode)
    fd = _syscall(_SYS_OPENAT2, dir_fd, rel.encode("utf-8", "surrogateescape"), how, size)
    if fd >= 0:
        _openat2_works = True
        return int(fd)
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM) and _openat2_works is None:
        # no openat2 here (old kernel, or a seccomp filter that says EPERM/ENOSYS)
        _openat2_works = False
        return None
    raise _errno_error(err, rel)


def split(rel: str) -> list[str]:
    """The components of a relative path; UnsafePath for '', '/', '.', '..' or NUL."""
    if not rel or rel.startswith("/") or "\x00" in rel:
        raise UnsafePath(errno.EINVAL, "not a relative path", rel)
    try:
        if not rel.isascii():  # ASCII always encodes: spare the call on the hot paths
            os.fsencode(rel)
    except UnicodeEncodeError:  # a lone surrogate: no file can have this name
        raise UnsafePath(errno.EINVAL, "not a valid file name", rel) from None
    parts = rel.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafePath(errno.EINVAL, "empty, '.' or '..' path component", rel)
    return parts


def open_beneath(dir_fd: int, rel: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """Open rel beneath dir_fd, following no symbolic link, never leaving dir_fd.

    flags are those of os.open; O_CLOEXEC, O_NOFOLLOW and O_NONBLOCK are always added.
    Raises UnsafePath for a link anywhere on the way or a path leaving the folder, and
    the usual OSErrors (FileNotFoundError, NotADirectoryError, ...) otherwise.
    """
    parts = split(rel)
    flags |= _SAFE
    if _O_PATH and flags & _O_PATH:
        flags &= ~os.O_NONBLOCK  # O_PATH takes no other flags: openat2 says EINVAL
        # O_PATH | O_NOFOLLOW opens a link at the last name as itself: only folders
        if not flags & os.O_DIRECTORY:
            raise ValueError("O_PATH is for folders here: add O_DIRECTORY")
    # One name needs no openat2: O_NOFOLLOW refuses a link as the last component, and a
    # name can neither be '..' nor lead through another folder (split checked). A plain
    # openat skips the ctypes call, which costs as much again as the open itself.
    fd = None if len(parts) == 1 else _openat2_beneath(dir_fd, rel, parts, flags, mode)
    if fd is not None:
        return fd
    # component by component: every folder on the way opened O_NOFOLLOW | O_DIRECTORY, for
    # lookups only (LOOKUP: search permission is all a path through it needs)
    current = dir_fd
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, LOOKUP | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=current)
            except OSError as e:
                if e.errno == errno.ENOTDIR and _is_link(current, part):
                    raise _errno_error(errno.ELOOP, rel) from None
                raise _errno_error(e.errno or 0, rel) from None
            if current != dir_fd:
                os.close(current)
            current = nxt
        try:
            return os.open(parts[-1], flags, mode, dir_fd=current)
        except OSError as e:
            if e.errno == errno.ELOOP or (
                e.errno == errno.ENOTDIR and flags & os.O_DIRECTORY and _is_link(current, parts[-1])
            ):
                raise _errno_error(errno.ELOOP, rel) from None
            raise
    finally:
        if current != dir_fd:
            os.close(current)


def _openat2_beneath(dir_fd: int, rel: str, parts: list[str], flags: int, mode: int) -> int | None:
    try:
        return _openat2(dir_fd, rel, flags, mode)
    except NotADirectoryError:
        # O_DIRECTORY | O_NOFOLLOW on a link says ENOTDIR, not ELOOP: name it a link
        if flags & os.O_DIRECTORY and _last_is_link(dir_fd, parts):
            raise _errno_error(errno.ELOOP, rel) from None
        raise


def _last_is_link(dir_fd: int, parts: list[str]) -> bool:
    """Whether the last of parts (two or more: one name is never opened through
    openat2) beneath dir_fd, with no link on the way, is a link."""
    try:
        parent = open_beneath(dir_fd, "/".join(parts[:-1]), LOOKUP)
    except OSError:
        return False
    try:
        return _is_link(parent, parts[-1])
    finally:
        os.close(parent)


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def open_dir(dir_fd: int, rel: str, flags: int = os.O_RDONLY | os.O_DIRECTORY) -> int:
    """A descriptor for the folder rel beneath dir_fd (links refused, see open_beneath)."""
    try:
        return open_beneath(dir_fd, rel, flags)
    except NotADirectoryError:
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", rel) from None


def lookup_dir(dir_fd: int, rel: str) -> int:
    """open_dir for a folder only looked in, never listed nor fsync-ed (LOOKUP): files
    are stat-ed and opened beneath it, which needs search permission only."""
    return open_dir(dir_fd, rel, LOOKUP)


def open_root(path: str | os.PathLike[str], flags: int = os.O_RDONLY | os.O_DIRECTORY) -> int:
    """A descriptor for a trusted top folder (the jobs root, an endpoint folder); flags
    LOOKUP for one only looked in (an archive: search permission is enough)."""
    return os.open(path, flags | os.O_CLOEXEC)


def open_regular(dir_fd: int, rel: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """open_beneath, then NotRegular unless it is a regular file.

    A FIFO, device or socket is refused from its lstat, before any open: opening one
    has effects of its own (a writer waiting in open() on a FIFO is let through, a
    device's driver runs). The fstat after the open covers a swap in between; O_NONBLOCK
    keeps a FIFO swapped in from blocking, and ENXIO (a FIFO without reader, a socket)
    says NotRegular too.
    """
    return open_regular_stat(dir_fd, rel, flags, mode)[0]


def open_regular_stat(
    dir_fd: int, rel: str, flags: int = os.O_RDONLY, mode: int = 0o644, *, listed: bool = False
) -> tuple[int, os.stat_result]:
    """open_regular, and the fstat of what was opened (its size, for a read).

    listed: rel is one name that a listing of dir_fd (kinds) has just shown as a regular
    file, so the lstat before the open is spared. Only a swap since the listing could
    put something else there, and the open covers that as it covers a swap after the
    lstat: O_NOFOLLOW refuses a link, O_NONBLOCK keeps a FIFO from blocking, the fstat
    refuses anything but a regular file before a byte is read. Read-only opens only.
    """
    parts = split(rel)
    try:
        if len(parts) == 1:
            if listed and not flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
                return _checked_regular(_open_name(dir_fd, rel, flags, mode), rel)
            return _open_regular_in(dir_fd, rel, flags, mode)
        # the lstat and the open look in the same folder, opened once
        parent = lookup_dir(dir_fd, "/".join(parts[:-1]))
        try:
            return _open_regular_in(parent, parts[-1], flags, mode)
        finally:
            os.close(parent)
    except OSError as e:
        e.filename = rel  # name the whole path, not the part that failed
        raise


def _open_regular_in(folder: int, name: str, flags: int, mode: int) -> tuple[int, os.stat_result]:
    try:
        st = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise  # nothing to open: the open would only say so again
    else:
        if not (stat.S_ISREG(st.st_mode) or _is_dir_or_link(st.st_mode)):
            raise NotRegular(errno.EINVAL, f"not a regular file ({kind(st.st_mode)})", name)
    try:
        fd = open_beneath(folder, name, flags, mode)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise NotRegular(
                errno.ENXIO, "not a regular file (named pipe or socket)", name
            ) from None
        raise
    return _checked_regular(fd, name)


def _open_name(dir_fd: int, name: str, flags: int, mode: int) -> int:
    """open_beneath of one name that split has checked, without splitting it again (a
    recursive transfer opens every file of a tree so): O_NOFOLLOW refuses a link."""
    try:
        return os.open(name, flags | _SAFE, mode, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _errno_error(errno.ELOOP, name) from None
        raise


def _checked_regular(fd: int, name: str) -> tuple[int, os.stat_result]:
    """fd and its fstat if it is a regular file; else closed, and NotRegular."""
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegular(errno.EINVAL, f"not a regular file ({kind(st.st_mode)})", name)
    return fd, st


def _is_dir_or_link(mode: int) -> bool:
    # left to open_beneath, which says what they are (IsADirectory on a write, UnsafePath)
    return stat.S_ISDIR(mode) or stat.S_ISLNK(mode)


_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "folder",
    stat.S_IFLNK: "symbolic link",
    stat.S_IFIFO: "named pipe",
    stat.S_IFSOCK: "socket",
}


def kind(mode: int) -> str:
    """A word for what an inode is, for error messages."""
    return _KINDS.get(stat.S_IFMT(mode), "device")


def read_fd(fd: int, limit: int, name: str = "", size: int | None = None) -> bytes:
    """All of an open regular file, or TooLarge if it holds more than limit bytes.

    size is the file's size if the caller has just taken its fstat (saves one here).
    """
    if size is None:
        size = os.fstat(fd).st_size
    if size > limit:
        raise TooLarge(errno.EFBIG, f"larger than {limit} bytes", name)
    # one read of a byte more than the file holds: getting exactly its size back means
    # the file ended there (a regular file reads short only at its end)
    first = os.read(fd, size + 1)
    if len(first) == size:
        return first
    chunks = [first]
    total = len(first)
    if total > limit:
        raise TooLarge(errno.EFBIG, f"larger than {limit} bytes", name)
    # read one byte past the limit: a file growing while it is read is caught too
    while chunk := os.read(fd, min(max(size, 1 << 16), limit + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise TooLarge(errno.EFBIG, f"larger than {limit} bytes", name)
    return b"".join(chunks)


def read_file(dir_fd: int, rel: str, limit: int) -> bytes | None:
    """The content of the regular file rel beneath dir_fd; None if there is none.

    UnsafePath (a link), NotRegular (FIFO, device, folder) and TooLarge are raised
    rather than treated as missing: the caller says what is wrong with the job.
    """
    try:
        fd, st = open_regular_stat(dir_fd, rel)
    except FileNotFoundError:
        return None
    try:
        return read_fd(fd, limit, rel, st.st_size)
    finally:
        os.close(fd)


def read_tail(dir_fd: int, rel: str, size: int) -> tuple[bytes, int] | None:
    """The last `size` bytes of a regular file and its whole length; None if missing."""
    try:
        fd = open_regular(dir_fd, rel)
    except FileNotFoundError:
        return None
    try:
        total = os.fstat(fd).st_size
        start = max(0, total - size)
        return os.pread(fd, total - start, start), total
    finally:
        os.close(fd)


def create_new(dir_fd: int, name: str, flags: int, mode: int = 0o644) -> int | None:
    """A regular file `name` (one name) made in dir_fd by this call and opened with flags;
    None if anything is at that name already. O_CREAT | O_EXCL | O_NOFOLLOW make exactly
    one file of ours, never through a link and never opening what is there, so there is
    nothing to look at before or after: one system call."""
    one_name(name)
    flags |= os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, mode, dir_fd=dir_fd)
    except FileExistsError:
        return None


def open_append(dir_fd: int, rel: str, mode: int = 0o644) -> int:
    """A regular file beneath dir_fd opened for appending, created if missing."""
    if os.sep not in rel:
        # most often the file is new (a job's LOG): one system call instead of four, and
        # no O_NONBLOCK to clear
        fd = create_new(dir_fd, rel, os.O_WRONLY | os.O_APPEND, mode)
        if fd is not None:
            return fd
    fd = open_regular(dir_fd, rel, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    # O_NONBLOCK is harmless on a regular file, but tasks inherit LOG as stdout: clear it
    os.set_blocking(fd, True)
    return fd


def append(dir_fd: int, rel: str, data: bytes, *, durable: bool = False) -> None:
    """Append data to a regular file beneath dir_fd (created if missing)."""
    fd = open_append(dir_fd, rel)
    try:
        write_all(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def temp_name(name: str) -> str:
    """A hidden temporary name beside name (hidden entries are never jobs or files)."""
    # 200 bytes, not characters, of name (whole characters only): under NAME_MAX (255)
    head = os.fsencode(name)[:200].decode(errors="ignore")
    return f".{head}.{_temp_random.getrandbits(48):012x}.tmp"


# Temporary names need to be unlikely to meet, not secret (O_EXCL refuses one that is
# taken): a generator seeded once, since a getrandom call per name is a system call per
# JOB saved. Seeded again in a forked child, which must not repeat its parent's names.
# Seeded without an argument, random seeds from os.urandom (as secrets would, whose
# import costs a built-in task's start some milliseconds).
_temp_random = random.Random()
os.register_at_fork(after_in_child=lambda: _temp_random.seed())


TEMP_SUFFIX = ".tmp"


def write_atomic(
    dir_fd: int, name: str, content: bytes, *, durable: bool = True, mode: int = 0o600
) -> None:
    """Replace dir_fd/name with content: a crash leaves the old or the new file, never a mix.

    The temporary file is hidden and lives in the same folder, so no listing shows it and
    the rename stays within one file system. Data is fsync-ed before the rename when
    durable. A link at `name` is replaced by the rename, never followed (a folder
    there is IsADirectoryError); name must be one name, not a path (UnsafePath).
    """
    one_name(name)
    for attempt in range(3):
        tmp = temp_name(name)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _SAFE, mode, dir_fd=dir_fd)
            break
        except FileExistsError:  # a name taken (by chance, or planted by a guess): another
            if attempt == 2:
                raise
    try:
        try:
            os.fchmod(fd, mode)  # the umask must not decide who may read it
            write_all(fd, content)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def rename_noreplace(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    src_dir_fd: int = _AT_FDCWD,
    dst_dir_fd: int = _AT_FDCWD,
) -> None:
    """Rename src to dst, FileExistsError if dst exists (even an empty folder).

    Plain rename(2) silently replaces an empty target folder; renameat2 with
    RENAME_NOREPLACE refuses atomically. File systems without it (NFS) fall back to a
    check then rename, which is only racy against another writer of the same name.

    A path given with a folder descriptor is user input: it is resolved beneath that
    folder like open_beneath (no link on the way, no '..'), and only its last name is
    handed to the rename. A path without one is taken as it is (trusted paths).
    """
    with _parent(src_dir_fd, src) as (sfd, sname), _parent(dst_dir_fd, dst) as (dfd, dname):
        _rename_noreplace(sname, dname, sfd, dfd)


@contextlib.contextmanager
def _parent(dir_fd: int, path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    """The folder holding path (a descriptor) and its last name, for a rename."""
    text = os.fspath(path)
    if "\x00" in text:  # ctypes would cut the name at the NUL: another file would move
        raise UnsafePath(errno.EINVAL, "a NUL in a path", text)
    parts = [text] if dir_fd == _AT_FDCWD else split(text)
    if len(parts) == 1:
        yield dir_fd, text
        return
    fd = open_dir(dir_fd, "/".join(parts[:-1]))
    try:
        yield fd, parts[-1]
    finally:
        os.close(fd)


def _rename_noreplace(src: str, dst: str, src_dir_fd: int, dst_dir_fd: int) -> None:
    if _renameat2 is not None:
        rc = _renameat2(
            src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), _RENAME_NOREPLACE
        )
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), src, None, dst)
    sfd = None if src_dir_fd == _AT_FDCWD else src_dir_fd
    dfd = None if dst_dir_fd == _AT_FDCWD else dst_dir_fd
    try:
        os.stat(dst, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(src, dst, src_dir_fd=sfd, dst_dir_fd=dfd)
        return
    raise FileExistsError(errno.EEXIST, "target exists", dst)


def has_syncfs() -> bool:
    """Whether syncfs works here (see syncfs): the C library has it, and the kernel did
    not refuse it yet."""
    return _syncfs is not None and _syncfs_works


def syncfs(fd: int) -> bool:
    """Flush the whole file system holding fd; False if this system has no syncfs."""
    global _syncfs_works
    if _syncfs is None:
        return False
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL):
            _syncfs_works = False  # (a sandbox without it: each flush would say so)
            return False
        raise OSError(err, os.strerror(err))
    return True


def lstat(dir_fd: int, rel: str) -> os.stat_result | None:
    """lstat of rel beneath dir_fd (the last component not followed); None if missing."""
    parts = split(rel)
    if len(parts) == 1:
        try:
            return os.stat(rel, dir_fd=dir_fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
    try:
        parent = lookup_dir(dir_fd, "/".join(parts[:-1]))
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    finally:
        os.close(parent)


@dataclass(frozen=True)
class Entry:
    """One name in a folder, without following it."""

    name: str
    mode: int
    size: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)


def _listed(dir_fd: int, hidden: bool) -> Iterator[os.DirEntry[str]]:
    """The entries of an open folder that entries and kinds give: hidden names only if
    asked for, names that are not valid text never (not valid UTF-8: no API can name
    them, so none lists them). os.scandir on a descriptor works on a duplicate, so
    dir_fd stays usable."""
    with os.scandir(dir_fd) as it:
        for e in it:
            if (hidden or not e.name.startswith(".")) and _is_text(e.name):
                yield e


def entries(dir_fd: int, *, hidden: bool = False) -> Iterator[Entry]:
    """The entries of an open folder, with their lstat's mode and size (see _listed)."""
    for e in _listed(dir_fd, hidden):
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        yield Entry(e.name, st.st_mode, st.st_size)


def kinds(dir_fd: int, *, hidden: bool = False) -> Iterator[tuple[str, int]]:
    """(name, file type bits) of an open folder's entries, as entries gives them but
    without a stat where the folder says the type (most file systems do): a walk over
    many small files spares one system call a file. The type is what the listing saw;
    whoever opens the name checks what it opens (open_regular_stat(listed=True))."""
    for e in _listed(dir_fd, hidden):
        try:
            if e.is_file(follow_symlinks=False):
                yield e.name, stat.S_IFREG
            elif e.is_dir(follow_symlinks=False):
                yield e.name, stat.S_IFDIR
            else:
                yield e.name, stat.S_IFMT(e.stat(follow_symlinks=False).st_mode)
        except FileNotFoundError:
            continue


def _is_text(name: str) -> bool:
    try:
        name.encode()
    except UnicodeEncodeError:  # surrogate escapes of undecodable bytes
        return False
    return True


def remove(dir_fd: int, rel: str, *, recursive: bool = False) -> bool:
    """Remove the file, link or (empty unless recursive) folder rel beneath dir_fd.

    Never follows a link: a link is removed itself, and the recursive removal walks by
    descriptors (shutil.rmtree's fd-based walk). False if nothing was there; OSError
    ENOTEMPTY for a non-empty folder without recursive.
    """
    parts = split(rel)
    parent = dir_fd if len(parts) == 1 else open_dir(dir_fd, "/".join(parts[:-1]))
    try:
        name = parts[-1]
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=parent)
        elif recursive:
            remove_tree(parent, name)
        else:
            os.rmdir(name, dir_fd=parent)
        return True
    finally:
        if parent != dir_fd:
            os.close(parent)


def remove_tree(dir_fd: int, name: str) -> None:
    """Remove the folder name inside dir_fd and all it holds, never following a link.

    Walks by descriptors: each folder is opened beneath the one holding it with
    O_NOFOLLOW | O_DIRECTORY | O_NONBLOCK, so a folder swapped for a link (to a folder
    outside, to a FIFO) is refused, not entered or waited on. (Python 3.11's
    shutil.rmtree opens folders without O_NOFOLLOW or O_NONBLOCK.) The walk is a loop,
    not a recursion, so a deep tree cannot exhaust Python's stack.
    """
    one_name(name)
    top = open_dir(dir_fd, name)
    stack = [_Level(dir_fd, name, top, [])]
    try:
        stack[0].subdirs = _clear(top)
        while stack:
            level = stack[-1]
            if not level.subdirs:
                stack.pop()
                os.close(level.fd)
                os.rmdir(level.name, dir_fd=level.parent)
                continue
            sub = level.subdirs.pop()
            try:
                fd = open_dir(level.fd, sub)
            except FileNotFoundError:
                continue
            except (UnsafePath, NotADirectoryError):
                _unlink(level.fd, sub)  # no longer a folder since listed: remove the name
                continue
            stack.append(_Level(level.fd, sub, fd, []))
            stack[-1].subdirs = _clear(fd)
    finally:
        for level in stack:
            os.close(level.fd)


@dataclass
class _Level:
    """One open folder of remove_tree's walk: where it is, and its folders left to do."""

    parent: int
    name: str
    fd: int
    subdirs: list[str]


def _clear(fd: int) -> list[str]:
    """Unlink every entry of the open folder fd that is not a folder; the folders."""
    subdirs = []
    with os.scandir(fd) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                subdirs.append(e.name)
            elif not _unlink(fd, e.name):
                subdirs.append(e.name)  # became a folder since it was listed
    return subdirs


def _unlink(dir_fd: int, name: str) -> bool:
    """Unlink a non-folder name; False if it is a folder, True if gone or removed."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        return False
    return True


def make_dirs(dir_fd: int, parts: list[str], made: list[str] | None = None) -> int:
    """Open (creating where missing) the folders parts beneath dir_fd; return the last.

    Folders created are appended to made as relative paths, so a failed operation can
    remove them again. A link or file on the way is refused (UnsafePath, NotADirectory),
    and so is a part that is not one name ('', '.', '..', 'a/b', NUL).
    """
    for part in parts:
        one_name(part)  # '..' or 'a/b' would lead out of dir_fd or through a link
    current = os.dup(dir_fd)
    try:
        for i, part in enumerate(parts):
            try:
                os.mkdir(part, 0o755, dir_fd=current)
                if made is not None:
                    made.append("/".join(parts[: i + 1]))
            except FileExistsError:
                pass
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | _SAFE, dir_fd=current)
            except OSError as e:
                if e.errno == errno.ENOTDIR and _is_link(current, part):
                    raise _errno_error(errno.ELOOP, "/".join(parts[: i + 1])) from None
                if e.errno == errno.ENOTDIR:
                    raise NotADirectoryError(
                        errno.ENOTDIR, "a parent of this path is a file", "/".join(parts[: i + 1])
                    ) from None
                raise _errno_error(e.errno or 0, "/".join(parts[: i + 1])) from None
            os.close(current)
            current = nxt
        return current
    except BaseException:
        os.close(current)
        raise


class Folders:
    """Descriptors of folders beneath one open top folder, each opened once while room lasts.

    A walk over many files in a few folders (an archive, a staging area) opens each
    folder once, by opener (open_dir: no link on the way, nothing outside top), and
    then every file by one name in it. The first `keep` folders stay open until
    close(); any further one is opened for each use and closed after it, so the
    descriptors held stay bounded however many folders a request names. "" is top.
    Safe to share between threads.
    """

    def __init__(
        self, top: int, keep: int = 64, opener: Callable[[int, str], int] | None = None
    ) -> None:
        self.top = top
        self.keep = keep
        self._opener = opener or open_dir
        self._open: dict[str, _Opened] = {"": _Opened(top, owned=False)}
        self._lock = threading.Lock()

    def open(self, rel: str) -> _Opened:
        """The folder rel beneath top, as a context manager giving its descriptor for the
        with block only (a kept folder's costs a lookup: this runs once or twice a file)."""
        found = self._open.get(rel)
        if found is not None:
            return found
        fd = self._opener(self.top, rel)
        with self._lock:
            if rel not in self._open and len(self._open) <= self.keep:
                found = self._open[rel] = _Opened(fd, owned=False)
                return found
        return _Opened(fd, owned=True)

    def close(self) -> None:
        """Close the folders kept open (not top, which the caller owns)."""
        with self._lock:
            kept, self._open = self._open, {"": _Opened(self.top, owned=False)}
        for rel, opened in kept.items():
            if rel:
                os.close(opened.fd)


class RecentFolders:
    """Descriptors of the `keep` folders beneath top used last, for one thread: a walk
    naming files folder by folder (a staging request's ids) opens each folder once
    while holding at most `keep`; the least recently used is closed for a new one.
    Same interface as Folders; "" is top."""

    def __init__(self, top: int, keep: int, opener: Callable[[int, str], int]) -> None:
        self.top = top
        self.keep = max(1, keep)
        self._opener = opener
        self._top = _Opened(top, owned=False)
        self._open: OrderedDict[str, _Opened] = OrderedDict()

    def open(self, rel: str) -> _Opened:
        """The folder rel, as Folders.open; valid until the next call (one thread)."""
        if not rel:
            return self._top
        found = self._open.get(rel)
        if found is not None:
            self._open.move_to_end(rel)
            return found
        found = self._open[rel] = _Opened(self._opener(self.top, rel), owned=False)
        if len(self._open) > self.keep:
            os.close(self._open.popitem(last=False)[1].fd)
        return found

    def close(self) -> None:
        """Close the folders held (not top, which the caller owns)."""
        held, self._open = self._open, OrderedDict()
        for opened in held.values():
            os.close(opened.fd)


class _Opened:
    """A folder descriptor for a with block: closed at its end if owned (a folder
    Folders does not keep), left open otherwise."""

    __slots__ = ("fd", "owned")

    def __init__(self, fd: int, *, owned: bool) -> None:
        self.fd = fd
        self.owned = owned

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *exc: object) -> None:
        if self.owned:
            os.close(self.fd)


def same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def version(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What changes when a file is replaced or written to, even within one mtime tick:
    a key for what was read from it."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def one_name(name: str) -> str:
    """name if it is a single path component (see split); UnsafePath otherwise."""
    if len(split(name)) != 1:
        raise UnsafePath(errno.EINVAL, "a name, not a path", name)
    return name


# -- unnamed files and writeback, for copies into a staging area ---------------------------

_linkat = getattr(_libc, "linkat", None)
_AT_EMPTY_PATH = 0x1000
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT = 1 | 4  # WAIT_BEFORE | WAIT_AFTER


def link_fd(
    fd: int, target: str | os.PathLike[str], how: str = "empty-path", *, dir_fd: int = _AT_FDCWD
) -> None:
    """Give the unnamed (O_TMPFILE) file fd the name target; FileExistsError if taken.

    how is "empty-path" (linkat with AT_EMPTY_PATH: needs CAP_DAC_READ_SEARCH) or "proc"
    (linking /proc/self/fd/N: needs /proc, fails across some container mounts). Like
    link(2) it never replaces an existing name, nor follows a link at it. With dir_fd,
    target is one name in that folder (UnsafePath otherwise).
    """
    name = os.fspath(target)
    if dir_fd != _AT_FDCWD:
        one_name(name)
    if how == "proc":
        os.link(
            f"/proc/self/fd/{fd}",
            name,
            dst_dir_fd=None if dir_fd == _AT_FDCWD else dir_fd,
            follow_symlinks=True,
        )
        return
    if _linkat is None:
        raise OSError(errno.ENOSYS, "no linkat on this system", name)
    if _linkat(fd, b"", dir_fd, os.fsencode(name), _AT_EMPTY_PATH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), name)


def open_unnamed(dir_fd: int, mode: int = 0o600) -> int:
    """A new unnamed regular file (O_TMPFILE) in the open folder dir_fd, read-write.

    Nothing is looked up by name: the file is made in the folder the descriptor holds.
    OSError (EOPNOTSUPP, EISDIR...) where the file system cannot make one.
    """
    if not _TMPFILE:
        raise OSError(errno.EOPNOTSUPP, "no O_TMPFILE on this system")
    return os.open(".", os.O_RDWR | _TMPFILE | os.O_CLOEXEC, mode, dir_fd=dir_fd)


def probe_unnamed(dir_fd: int, probe_name: str) -> str | None:
    """How unnamed files (open_unnamed) get a name in the folder dir_fd's file system:
    "empty-path" or "proc" (link_fd's `how`), or None (NFS, old kernels).

    An O_TMPFILE file needs no directory entry until it is linked: one directory
    operation per copy instead of a create and a rename, and a killed copy leaves
    nothing behind. linkat with AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; the
    /proc/self/fd form does not, but fails across some container mounts. probe_name (one
    name, the caller's own temporary kind) is linked and removed again to find out.
    """
    try:
        fd = open_unnamed(dir_fd)
    except OSError:
        return None
    try:
        for how in ("empty-path", "proc"):
            try:
                link_fd(fd, probe_name, how, dir_fd=dir_fd)
            except OSError:
                continue
            with contextlib.suppress(OSError):
                os.unlink(probe_name, dir_fd=dir_fd)
            return how
        return None
    finally:
        os.close(fd)


def sync_file_range(fd: int, offset: int, length: int, *, wait: bool = False) -> bool:
    """Start writing a range of fd to disk (with wait, also wait until it is written);
    False if unsupported.

    A hint: it flushes no metadata nor the disk's cache, and write errors still surface
    at the fsync that follows.
    """
    if _sync_file_range is None:
        return False
    flags = _SYNC_FILE_RANGE_WRITE | (_SYNC_FILE_RANGE_WAIT if wait else 0)
    return int(_sync_file_range(fd, offset, length, flags)) == 0
