"""The access layer for user folders (batchingest/fs.py): containment, no links, no hangs.

Every test runs twice: with openat2 (where the kernel has it) and with the
component-by-component O_NOFOLLOW fallback, which the module switches to when
`fs._openat2_works` is False.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modes import unprivileged

from batchingest import fs

SENTINEL = b"OUTSIDE-SENTINEL-7f3a9c"


def _kernel_has_openat2() -> bool:
    saved = fs._openat2_works
    fs._openat2_works = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # two components: one name is opened without openat2
            Path(tmp, "sub").mkdir()
            Path(tmp, "sub", "probe").write_bytes(b"")
            fd = fs.open_root(tmp)
            try:
                os.close(fs.open_beneath(fd, "sub/probe"))
            finally:
                os.close(fd)
        return fs._openat2_works is True
    finally:
        fs._openat2_works = saved


HAS_OPENAT2 = _kernel_has_openat2()


@pytest.fixture(params=["openat2", "fallback"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which way open_beneath resolves; the module flag is restored after the test."""
    if request.param == "openat2":
        if not HAS_OPENAT2:
            pytest.skip("this kernel has no openat2")
        monkeypatch.setattr(fs, "_openat2_works", None)
    else:
        monkeypatch.setattr(fs, "_openat2_works", False)
    return str(request.param)


def _can_mknod() -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            os.mknod(os.path.join(tmp, "n"), stat.S_IFCHR | 0o600, os.stat("/dev/null").st_rdev)
        except OSError:
            return False
        return True


CAN_MKNOD = _can_mknod()


class Hang(Exception):
    """A call blocked past its deadline."""


@contextlib.contextmanager
def deadline(seconds: float = 2.0) -> Iterator[None]:
    """Raise Hang in the main thread if the block takes longer than seconds.

    A blocking open of a FIFO is interrupted by the signal (the handler raises, so the
    call is not retried). pytest-timeout's own timer is put back afterwards.
    """

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    left, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if left:
            signal.setitimer(signal.ITIMER_REAL, max(left - (time.monotonic() - start), 0.01))


@dataclass
class Tree:
    """base/jail holds the user tree; base/outside holds what must never be touched."""

    base: Path
    jail: Path
    outside: Path
    fd: int

    def snapshot(self) -> dict[str, tuple[object, ...]]:
        return snapshot(self.base, skip=self.jail)


def snapshot(base: Path, skip: Path) -> dict[str, tuple[object, ...]]:
    """Names, kinds, sizes, mtimes and contents of everything under base but skip."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        if Path(dirpath) == base:
            dirnames[:] = [d for d in dirnames if base / d != skip]
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = Path(p).read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            key = os.path.relpath(p, base)
            out[key] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, content)
    return out


def make_outside(base: Path) -> Path:
    outside = base / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret").write_bytes(SENTINEL)
    (outside / "dir" / "secret").write_bytes(SENTINEL + b"-2")
    (outside / "empty").mkdir()
    return outside


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Tree]:
    """A jail full of traps next to an outside folder with sentinels."""
    base = tmp_path
    outside = make_outside(base)
    j = base / "jail"
    (j / "sub" / "deep").mkdir(parents=True)
    (j / "empty").mkdir()
    (j / "file.txt").write_bytes(b"hello")
    (j / "sub" / "inner.txt").write_bytes(b"inner")
    (j / "sub" / "deep" / "x").write_bytes(b"x")
    os.symlink("file.txt", j / "link_in")
    os.symlink("sub", j / "dirlink_in")
    os.symlink("../outside/secret", j / "link_out")
    os.symlink(str(outside / "secret"), j / "abs_out")
    os.symlink("../outside", j / "dirlink_out")
    os.symlink(str(outside), j / "abs_dirlink_out")
    os.symlink("../outside/created", j / "dangling_out")
    os.symlink("nowhere", j / "dangling")
    os.symlink("loop", j / "loop")
    os.symlink("/dev/zero", j / "zero")
    os.mkfifo(j / "fifo")
    os.mkfifo(j / "sub" / "fifo")
    if CAN_MKNOD:
        os.mknod(j / "null", stat.S_IFCHR | 0o600, os.stat("/dev/null").st_rdev)
    fd = fs.open_root(j)
    t = Tree(base, j, outside, fd)
    before = t.snapshot()
    try:
        yield t
    finally:
        os.close(fd)
    # whatever a test did inside the jail, nothing outside it changed
    assert t.snapshot() == before


LINKS = ["link_in", "dirlink_in", "link_out", "abs_out", "dirlink_out", "abs_dirlink_out"]
LINKS += ["dangling_out", "dangling", "loop", "zero"]
THROUGH_LINKS = ["dirlink_in/inner.txt", "dirlink_out/secret", "abs_dirlink_out/secret"]
THROUGH_LINKS += ["dirlink_out/dir/secret", "loop/x", "dangling/x"]
MALFORMED = ["", "/", "/etc/hostname", "..", "../outside/secret", "sub/../file.txt", "."]
MALFORMED += ["./file.txt", "sub//inner.txt", "sub/", "file.txt\x00", "a\x00b", "\udcff/../x"]


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def is_nonblocking(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)


# -- open_beneath ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["JOB", "a b", "\udcff", "n" * 255, "..."])
def test_one_name_accepts_a_name(name: str) -> None:
    assert fs.one_name(name) == name


@pytest.mark.parametrize("name", [*MALFORMED, "a/b", "sub/inner.txt"])
def test_one_name_refuses_paths_and_malformed_names(name: str) -> None:
    with pytest.raises(fs.UnsafePath):
        fs.one_name(name)


def test_open_beneath_reads_a_file_beneath(resolver: str, tree: Tree) -> None:
    fd = fs.open_beneath(tree.fd, "sub/deep/x")
    try:
        assert os.read(fd, 10) == b"x"
        assert is_nonblocking(fd)
        assert not os.get_inheritable(fd)
        assert fd_path(fd) == str(tree.jail / "sub" / "deep" / "x")
    finally:
        os.close(fd)
    if resolver == "openat2":
        assert fs._openat2_works is True


@pytest.mark.parametrize("rel", LINKS + THROUGH_LINKS)
def test_open_beneath_never_follows_a_link(resolver: str, tree: Tree, rel: str) -> None:
    for flags in (os.O_RDONLY, os.O_RDONLY | os.O_DIRECTORY, os.O_WRONLY | os.O_CREAT):
        with pytest.raises(fs.UnsafePath) as e:
            fs.open_beneath(tree.fd, rel, flags)
        assert e.value.errno == errno.ELOOP
    assert not (tree.outside / "created").exists()


@pytest.mark.parametrize("rel", MALFORMED)
def test_open_beneath_refuses_malformed_paths(resolver: str, tree: Tree, rel: str) -> None:
    with pytest.raises(fs.UnsafePath) as e:
        fs.open_beneath(tree.fd, rel)
    assert e.value.errno == errno.EINVAL


def test_open_beneath_missing_and_not_a_folder(resolver: str, tree: Tree) -> None:
    with pytest.raises(FileNotFoundError):
        fs.open_beneath(tree.fd, "nothere")
    with pytest.raises(FileNotFoundError):
        fs.open_beneath(tree.fd, "nothere/x")
    with pytest.raises(NotADirectoryError):
        fs.open_beneath(tree.fd, "file.txt/x")
    with pytest.raises(OSError) as e:
        fs.open_beneath(tree.fd, "n" * 300)
    assert e.value.errno == errno.ENAMETOOLONG


def test_open_beneath_creates_with_mode(resolver: str, tree: Tree) -> None:
    fd = fs.open_beneath(tree.fd, "sub/new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    assert stat.S_IMODE(os.stat(tree.jail / "sub" / "new").st_mode) == 0o600
    with pytest.raises(FileExistsError):
        fs.open_beneath(tree.fd, "sub/new", os.O_WRONLY | os.O_CREAT | os.O_EXCL)


def test_open_beneath_a_fifo_does_not_block(resolver: str, tree: Tree) -> None:
    with deadline():
        fd = fs.open_beneath(tree.fd, "sub/fifo")
    try:
        assert stat.S_ISFIFO(os.fstat(fd).st_mode)
        assert os.read(fd, 10) == b""  # O_NONBLOCK: no writer, nothing to wait for
    finally:
        os.close(fd)


# -- open_dir, open_root, open_regular ---------------------------------------------------


@pytest.mark.parametrize("opener", [fs.open_dir, fs.lookup_dir])
def test_open_dir(resolver: str, tree: Tree, opener: Callable[[int, str], int]) -> None:
    fd = opener(tree.fd, "sub/deep")
    try:
        assert fd_path(fd) == str(tree.jail / "sub" / "deep")
    finally:
        os.close(fd)
    with pytest.raises(NotADirectoryError):
        opener(tree.fd, "file.txt")
    with pytest.raises(NotADirectoryError):
        opener(tree.fd, "fifo")
    with pytest.raises(FileNotFoundError):
        opener(tree.fd, "nothere")
    for rel in ("dirlink_in", "dirlink_out", "abs_dirlink_out", "dirlink_in/deep", "sub/../sub"):
        with pytest.raises(fs.UnsafePath):
            opener(tree.fd, rel)


def test_lookup_dir_is_for_lookups_only(resolver: str, tree: Tree) -> None:
    fd = fs.lookup_dir(tree.fd, "sub/deep")
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_PATH  # needs search permission only
        assert fs.lstat(fd, "x") is not None
        assert fs.read_file(fd, "x", 10) == b"x"
        # what needs read permission is refused: never list nor fsync such a descriptor
        with pytest.raises(OSError) as listed:
            os.listdir(fd)
        assert listed.value.errno == errno.EBADF
        with pytest.raises(OSError) as synced:
            os.fsync(fd)
        assert synced.value.errno == errno.EBADF
    finally:
        os.close(fd)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # less the listing's own


def test_recent_folders_hold_the_last_used_only(tree: Tree) -> None:
    """A request's ids folder by folder: each folder opened once, at most keep held, the
    least recently used closed for a new one."""
    opened: list[str] = []

    def opener(top: int, rel: str) -> int:
        opened.append(rel)
        return fs.lookup_dir(top, rel)

    before = open_fds()
    folders = fs.RecentFolders(tree.fd, 2, opener)
    for rel in ("sub", "sub", "sub/deep", "sub", "empty", "sub", "sub/deep", ""):
        with folders.open(rel) as fd:
            assert fd_path(fd) == str(tree.jail / rel).rstrip("/")
        assert open_fds() - before <= 2
    # "sub" stayed (used last but one each time); "sub/deep" was closed for "empty"
    assert opened == ["sub", "sub/deep", "empty", "sub/deep"]
    with pytest.raises(fs.UnsafePath):
        folders.open("dirlink_in")
    folders.close()
    assert open_fds() == before
    os.fstat(tree.fd)  # top is the caller's: still open


SEARCH_ONLY = """
import os, sys
from batchingest import fs
if sys.argv[2] == "fallback":
    fs._openat2_works = False
top = fs.open_root(sys.argv[1], fs.LOOKUP)
assert fs.read_file(top, "sub/deep/x", 10) == b"x"
assert fs.lstat(top, "sub/deep/x") is not None
deep = fs.lookup_dir(top, "sub/deep")
assert fs.read_file(deep, "x", 10) == b"x"
try:
    fs.open_dir(top, "sub/deep")  # listing it needs read permission: refused
except PermissionError:
    print("ok")
"""


def test_folders_with_search_permission_only_are_passed_through(resolver: str, tree: Tree) -> None:
    """Looking beneath a 0711 folder needs no read permission on it, as with a path: the
    folders on the way and those opened for lookups are opened O_PATH."""
    for rel in ("sub", "sub/deep", ""):
        (tree.jail / rel).chmod(0o111)
    try:
        p = subprocess.run(
            unprivileged([sys.executable, "-c", SEARCH_ONLY, str(tree.jail), resolver]),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        for rel in ("", "sub", "sub/deep"):
            (tree.jail / rel).chmod(0o755)
    assert p.stdout == "ok\n", p.stderr


def test_open_root_is_a_folder_descriptor(tree: Tree) -> None:
    fd = fs.open_root(tree.jail / "sub")
    try:
        assert stat.S_ISDIR(os.fstat(fd).st_mode)
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)
    with pytest.raises(NotADirectoryError):
        fs.open_root(tree.jail / "file.txt")


def test_open_regular(resolver: str, tree: Tree) -> None:
    fd = fs.open_regular(tree.fd, "sub/inner.txt")
    try:
        assert os.read(fd, 100) == b"inner"
    finally:
        os.close(fd)
    for rel in ("sub", "empty", "fifo", *(["null"] if CAN_MKNOD else [])):
        with deadline(), pytest.raises(fs.NotRegular):
            fs.open_regular(tree.fd, rel)
    with pytest.raises(fs.UnsafePath):
        fs.open_regular(tree.fd, "link_in")
    with pytest.raises(FileNotFoundError):
        fs.open_regular(tree.fd, "nothere")
    # errors name the whole path asked for
    for rel, error in (("sub/fifo", fs.NotRegular), ("sub/none", FileNotFoundError)):
        with pytest.raises(error) as e:
            fs.open_regular(tree.fd, rel)
        assert e.value.filename == rel
    with pytest.raises(fs.UnsafePath) as e:
        fs.open_regular(tree.fd, "dirlink_in/inner.txt")
    assert e.value.filename == "dirlink_in/inner.txt"


def test_open_regular_listed_checks_what_it_opens(resolver: str, tree: Tree) -> None:
    """listed=True spares the lstat, not the checks: a folder, FIFO, device or link found
    under a name a listing called a file (swapped in since) is refused, without blocking."""
    fd, st = fs.open_regular_stat(tree.fd, "file.txt", listed=True)
    try:
        assert os.read(fd, 100) == b"hello" and st.st_size == 5 and is_nonblocking(fd)
    finally:
        os.close(fd)
    for rel in ("sub", "fifo", *(["null"] if CAN_MKNOD else [])):
        with deadline(), pytest.raises(fs.NotRegular):
            fs.open_regular_stat(tree.fd, rel, listed=True)
    for rel in LINKS:
        with pytest.raises(fs.UnsafePath):
            fs.open_regular_stat(tree.fd, rel, listed=True)
    with pytest.raises(fs.UnsafePath):
        fs.open_regular_stat(tree.fd, "dirlink_in/inner.txt", listed=True)
    with deadline(), pytest.raises(fs.NotRegular):  # a write still looks before it opens
        fs.open_regular_stat(tree.fd, "fifo", os.O_WRONLY, listed=True)


# -- reading -------------------------------------------------------------------------------


def test_read_fd_limits(tree: Tree) -> None:
    (tree.jail / "ten").write_bytes(b"0123456789")
    (tree.jail / "none").write_bytes(b"")
    fd = os.open(tree.jail / "ten", os.O_RDONLY)
    try:
        assert fs.read_fd(fd, 10) == b"0123456789"
        os.lseek(fd, 0, os.SEEK_SET)
        with pytest.raises(fs.TooLarge) as e:
            fs.read_fd(fd, 9, "ten")
        assert e.value.errno == errno.EFBIG
        assert e.value.filename == "ten"
    finally:
        os.close(fd)
    fd = os.open(tree.jail / "none", os.O_RDONLY)
    try:
        assert fs.read_fd(fd, 0) == b""
    finally:
        os.close(fd)


def test_read_fd_with_a_stale_size_reads_the_whole_file(tree: Tree) -> None:
    # the size a caller took from fstat before the file grew: the read goes on past it
    (tree.jail / "grew").write_bytes(b"x" * 103)
    fd = os.open(tree.jail / "grew", os.O_RDONLY)
    try:
        assert fs.read_fd(fd, 200, "grew", size=3) == b"x" * 103
        os.lseek(fd, 0, os.SEEK_SET)
        with pytest.raises(fs.TooLarge):
            fs.read_fd(fd, 50, "grew", size=3)
        os.lseek(fd, 0, os.SEEK_SET)
        assert fs.read_fd(fd, 200, "grew", size=103) == b"x" * 103
    finally:
        os.close(fd)


def test_read_fd_counts_what_was_appended_after_the_open(tree: Tree) -> None:
    (tree.jail / "grows").write_bytes(b"abc")
    fd = os.open(tree.jail / "grows", os.O_RDONLY)
    try:
        with open(tree.jail / "grows", "ab") as w:
            w.write(b"d" * 100)
        with pytest.raises(fs.TooLarge):
            fs.read_fd(fd, 50)
    finally:
        os.close(fd)


def test_read_file(resolver: str, tree: Tree) -> None:
    assert fs.read_file(tree.fd, "file.txt", 5) == b"hello"
    assert fs.read_file(tree.fd, "sub/deep/x", 1) == b"x"
    assert fs.read_file(tree.fd, "nothere", 5) is None
    assert fs.read_file(tree.fd, "nothere/x", 5) is None
    with pytest.raises(fs.TooLarge):
        fs.read_file(tree.fd, "file.txt", 4)
    with pytest.raises(NotADirectoryError):
        fs.read_file(tree.fd, "file.txt/x", 5)
    with pytest.raises(fs.NotRegular):
        fs.read_file(tree.fd, "sub", 5)
    for rel in LINKS + THROUGH_LINKS:
        with pytest.raises(fs.UnsafePath):
            fs.read_file(tree.fd, rel, 1 << 20)


def test_read_file_size_cap_dev_zero_and_fifo(resolver: str, tree: Tree) -> None:
    (tree.jail / "big").write_bytes(b"b" * (1 << 20))
    with pytest.raises(fs.TooLarge):
        fs.read_file(tree.fd, "big", (1 << 20) - 1)
    assert fs.read_file(tree.fd, "big", 1 << 20) == b"b" * (1 << 20)
    with deadline(), pytest.raises(fs.UnsafePath):
        fs.read_file(tree.fd, "zero", 1 << 20)
    with deadline(), pytest.raises(fs.NotRegular):
        fs.read_file(tree.fd, "fifo", 1 << 20)
    if CAN_MKNOD:
        with deadline(), pytest.raises(fs.NotRegular):
            fs.read_file(tree.fd, "null", 1 << 20)


def test_read_tail(resolver: str, tree: Tree) -> None:
    (tree.jail / "log").write_bytes(b"0123456789")
    assert fs.read_tail(tree.fd, "log", 3) == (b"789", 10)
    assert fs.read_tail(tree.fd, "log", 100) == (b"0123456789", 10)
    assert fs.read_tail(tree.fd, "log", 0) == (b"", 10)
    assert fs.read_tail(tree.fd, "nothere", 3) is None
    with pytest.raises(fs.UnsafePath):
        fs.read_tail(tree.fd, "link_out", 3)
    with deadline(), pytest.raises(fs.NotRegular):
        fs.read_tail(tree.fd, "fifo", 3)


# -- writing -------------------------------------------------------------------------------


def test_open_append_creates_and_is_blocking(resolver: str, tree: Tree) -> None:
    fd = fs.open_append(tree.fd, "sub/LOG", 0o640)
    try:
        assert not is_nonblocking(fd)  # tasks inherit it as stdout
        os.write(fd, b"one\n")
    finally:
        os.close(fd)
    fd = fs.open_append(tree.fd, "sub/LOG")
    try:
        os.write(fd, b"two\n")
    finally:
        os.close(fd)
    assert (tree.jail / "sub" / "LOG").read_bytes() == b"one\ntwo\n"
    assert stat.S_IMODE(os.stat(tree.jail / "sub" / "LOG").st_mode) & 0o7 == 0


def test_open_append_of_one_name_new_or_old(resolver: str, tree: Tree) -> None:
    fd = fs.open_append(tree.fd, "LOG", 0o640)  # new: made by one O_EXCL open
    try:
        assert not is_nonblocking(fd)  # tasks inherit it as stdout
        os.write(fd, b"one\n")
    finally:
        os.close(fd)
    fd = fs.open_append(tree.fd, "LOG")  # there already: appended to, not replaced
    try:
        assert not is_nonblocking(fd)
        os.write(fd, b"two\n")
    finally:
        os.close(fd)
    assert (tree.jail / "LOG").read_bytes() == b"one\ntwo\n"
    assert stat.S_IMODE(os.stat(tree.jail / "LOG").st_mode) & 0o7 == 0


def test_open_append_refuses_links_and_folders(resolver: str, tree: Tree) -> None:
    for rel in LINKS + THROUGH_LINKS:
        with pytest.raises(fs.UnsafePath):
            fs.open_append(tree.fd, rel)
    with pytest.raises(IsADirectoryError):
        fs.open_append(tree.fd, "sub")
    with pytest.raises(FileNotFoundError):
        fs.open_append(tree.fd, "nothere/LOG")
    assert not (tree.outside / "created").exists()


def test_append(resolver: str, tree: Tree) -> None:
    fs.append(tree.fd, "sub/LOG", b"a")
    fs.append(tree.fd, "sub/LOG", b"b" * 100_000, durable=True)
    assert (tree.jail / "sub" / "LOG").read_bytes() == b"a" + b"b" * 100_000
    for rel in ("link_out", "abs_out", "dangling_out", "dirlink_out/secret"):
        with pytest.raises(fs.UnsafePath):
            fs.append(tree.fd, rel, b"x")


def test_write_all_writes_everything(tree: Tree) -> None:
    r, w = os.pipe()
    try:
        fs.write_all(w, b"abc")
        assert os.read(r, 10) == b"abc"
    finally:
        os.close(r)
        os.close(w)


def test_temp_name_is_hidden_and_short_enough() -> None:
    name = fs.temp_name("JOB")
    assert name.startswith(".JOB.") and name.endswith(fs.TEMP_SUFFIX)
    assert fs.temp_name("JOB") != name
    assert len(fs.temp_name("n" * 255)) <= 255


def test_temp_names_of_a_forked_child_are_not_its_parents() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next name, then out at once
        os.write(w, fs.temp_name("JOB").encode())
        os._exit(0)
    os.close(w)
    try:
        child = os.read(r, 300).decode()
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert child.startswith(".JOB.") and child != fs.temp_name("JOB")


def test_write_atomic(resolver: str, tree: Tree) -> None:
    fs.write_atomic(tree.fd, "JOB", b"one")
    old = os.umask(0)
    try:
        fs.write_atomic(tree.fd, "JOB", b"two", durable=False)
    finally:
        os.umask(old)
    assert (tree.jail / "JOB").read_bytes() == b"two"
    assert stat.S_IMODE(os.stat(tree.jail / "JOB").st_mode) == 0o600
    fs.write_atomic(tree.fd, "pub", b"p", mode=0o644)
    assert stat.S_IMODE(os.stat(tree.jail / "pub").st_mode) == 0o644
    assert not [n for n in os.listdir(tree.jail) if n.endswith(fs.TEMP_SUFFIX)]


def test_write_atomic_replaces_a_link_instead_of_following_it(resolver: str, tree: Tree) -> None:
    for name in ("link_out", "abs_out", "dangling_out", "dirlink_out", "fifo"):
        with deadline():
            fs.write_atomic(tree.fd, name, b"mine")
        assert (tree.jail / name).read_bytes() == b"mine"
        assert not (tree.jail / name).is_symlink()
    assert not (tree.outside / "created").exists()


def test_write_atomic_refusals_leave_no_temporary(resolver: str, tree: Tree) -> None:
    with pytest.raises(fs.UnsafePath):
        fs.write_atomic(tree.fd, "sub/x", b"x")
    with pytest.raises(IsADirectoryError):
        fs.write_atomic(tree.fd, "empty", b"x")
    assert not [n for n in os.listdir(tree.jail) if n.endswith(fs.TEMP_SUFFIX)]


# -- renaming, syncing ---------------------------------------------------------------------


@pytest.mark.parametrize("renameat2", ["renameat2", "check-then-rename"])
def test_rename_noreplace(tree: Tree, renameat2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if renameat2 != "renameat2":
        monkeypatch.setattr(fs, "_renameat2", None)
    fs.rename_noreplace("file.txt", "moved", src_dir_fd=tree.fd, dst_dir_fd=tree.fd)
    assert (tree.jail / "moved").read_bytes() == b"hello"
    with pytest.raises(FileExistsError):
        fs.rename_noreplace("moved", "empty", src_dir_fd=tree.fd, dst_dir_fd=tree.fd)
    with pytest.raises(FileExistsError):
        fs.rename_noreplace("moved", "link_out", src_dir_fd=tree.fd, dst_dir_fd=tree.fd)
    with pytest.raises(FileNotFoundError):
        fs.rename_noreplace("nothere", "x", src_dir_fd=tree.fd, dst_dir_fd=tree.fd)
    # a link is moved itself, never its target
    fs.rename_noreplace("link_out", "sub/l", src_dir_fd=tree.fd, dst_dir_fd=tree.fd)
    assert os.readlink(tree.jail / "sub" / "l") == "../outside/secret"
    # plain paths (the jobs root moves jobs by path)
    fs.rename_noreplace(tree.jail / "moved", tree.jail / "empty" / "m")
    assert (tree.jail / "empty" / "m").read_bytes() == b"hello"
    with pytest.raises(FileExistsError):
        fs.rename_noreplace(str(tree.jail / "sub"), str(tree.jail / "empty"))


def test_syncfs(tree: Tree) -> None:
    assert fs.syncfs(tree.fd) is True
    with pytest.raises(OSError) as e:
        fs.syncfs(987_654)
    assert e.value.errno == errno.EBADF


# -- looking -------------------------------------------------------------------------------


def test_lstat(resolver: str, tree: Tree) -> None:
    st = fs.lstat(tree.fd, "sub/inner.txt")
    assert st is not None and st.st_size == 5
    st = fs.lstat(tree.fd, "link_out")
    assert st is not None and stat.S_ISLNK(st.st_mode)
    st = fs.lstat(tree.fd, "sub/fifo")
    assert st is not None and stat.S_ISFIFO(st.st_mode)
    assert fs.lstat(tree.fd, "nothere") is None
    assert fs.lstat(tree.fd, "nothere/x") is None
    assert fs.lstat(tree.fd, "file.txt/x") is None
    for rel in THROUGH_LINKS:
        with pytest.raises(fs.UnsafePath):
            fs.lstat(tree.fd, rel)
    for rel in MALFORMED:
        with pytest.raises(fs.UnsafePath):
            fs.lstat(tree.fd, rel)


def test_entries(tree: Tree) -> None:
    (tree.jail / ".hidden").write_bytes(b"h")
    os.close(os.open(os.fsencode(tree.jail) + b"/bad\xff", os.O_CREAT | os.O_WRONLY))
    found = {e.name: e for e in fs.entries(tree.fd)}
    assert ".hidden" not in found
    assert not any("bad" in n for n in found)
    assert found["file.txt"].is_file and found["file.txt"].size == 5
    assert found["sub"].is_dir and not found["sub"].is_file
    assert stat.S_ISLNK(found["dirlink_out"].mode) and not found["dirlink_out"].is_dir
    assert stat.S_ISFIFO(found["fifo"].mode)
    assert ".hidden" in {e.name for e in fs.entries(tree.fd, hidden=True)}
    # the folder descriptor is still usable, from its start
    assert {e.name for e in fs.entries(tree.fd)} == set(found)
    os.unlink(os.fsencode(tree.jail) + b"/bad\xff")


def test_kinds_says_what_entries_says(tree: Tree) -> None:
    (tree.jail / ".hidden").write_bytes(b"h")
    os.close(os.open(os.fsencode(tree.jail) + b"/bad\xff", os.O_CREAT | os.O_WRONLY))
    for hidden in (False, True):
        kinds = dict(fs.kinds(tree.fd, hidden=hidden))
        assert kinds == {e.name: stat.S_IFMT(e.mode) for e in fs.entries(tree.fd, hidden=hidden)}
        assert (".hidden" in kinds) is hidden
    assert kinds["file.txt"] == stat.S_IFREG and kinds["sub"] == stat.S_IFDIR
    assert kinds["link_in"] == stat.S_IFLNK and kinds["fifo"] == stat.S_IFIFO
    os.unlink(os.fsencode(tree.jail) + b"/bad\xff")


def test_kind_and_same_inode(tree: Tree) -> None:
    words = {n: fs.kind(os.lstat(tree.jail / n).st_mode) for n in ("file.txt", "sub", "fifo")}
    assert words == {"file.txt": "file", "sub": "folder", "fifo": "named pipe"}
    assert fs.kind(os.lstat(tree.jail / "loop").st_mode) == "symbolic link"
    assert fs.kind(stat.S_IFSOCK) == "socket"
    assert fs.kind(stat.S_IFCHR) == "device"
    a, b = os.stat(tree.jail / "file.txt"), os.stat(tree.jail / "link_in")
    assert fs.same_inode(a, b)
    assert not fs.same_inode(a, os.stat(tree.jail / "sub"))


# -- removing, making ----------------------------------------------------------------------


def test_remove(resolver: str, tree: Tree) -> None:
    assert fs.remove(tree.fd, "sub/deep/x") is True
    assert not (tree.jail / "sub" / "deep" / "x").exists()
    assert fs.remove(tree.fd, "sub/deep/x") is False
    assert fs.remove(tree.fd, "sub/deep") is True
    assert fs.remove(tree.fd, "sub/fifo") is True
    for rel in ("link_out", "abs_out", "dirlink_out", "abs_dirlink_out", "loop", "zero"):
        assert fs.remove(tree.fd, rel) is True
        assert not os.path.lexists(tree.jail / rel)
    with pytest.raises(OSError) as e:
        fs.remove(tree.fd, "sub")
    assert e.value.errno == errno.ENOTEMPTY
    for rel in ("dirlink_out/secret", "abs_dirlink_out/dir", "dirlink_in/inner.txt"):
        with pytest.raises((fs.UnsafePath, FileNotFoundError)):
            fs.remove(tree.fd, rel, recursive=True)
    with pytest.raises(FileNotFoundError):
        fs.remove(tree.fd, "nothere/x")
    for rel in MALFORMED:
        with pytest.raises(fs.UnsafePath):
            fs.remove(tree.fd, rel, recursive=True)


def test_remove_recursive_does_not_follow_links(resolver: str, tree: Tree) -> None:
    (tree.jail / "sub" / "deep" / "more").mkdir()
    os.symlink("../../../../outside", tree.jail / "sub" / "deep" / "more" / "up")
    os.symlink(str(tree.outside / "dir"), tree.jail / "sub" / "abs")
    with deadline():
        assert fs.remove(tree.fd, "sub", recursive=True) is True
    assert not (tree.jail / "sub").exists()
    assert fs.remove(tree.fd, "sub", recursive=True) is False


def test_remove_tree(resolver: str, tree: Tree) -> None:
    with deadline():
        fs.remove_tree(tree.fd, "sub")
    assert not (tree.jail / "sub").exists()
    with pytest.raises(FileNotFoundError):
        fs.remove_tree(tree.fd, "sub")


def test_make_dirs(resolver: str, tree: Tree) -> None:
    made: list[str] = []
    fd = fs.make_dirs(tree.fd, ["sub", "a", "b"], made)
    try:
        assert fd_path(fd) == str(tree.jail / "sub" / "a" / "b")
    finally:
        os.close(fd)
    assert made == ["sub/a", "sub/a/b"]
    fd = fs.make_dirs(tree.fd, ["sub", "a", "b"], made)
    os.close(fd)
    assert made == ["sub/a", "sub/a/b"]
    fd = fs.make_dirs(tree.fd, [])
    try:
        assert fd_path(fd) == str(tree.jail)
    finally:
        os.close(fd)
    for parts in (["dirlink_out", "x"], ["abs_dirlink_out"], ["sub", "deep", "x", "y"]):
        with pytest.raises((fs.UnsafePath, NotADirectoryError)):
            fs.make_dirs(tree.fd, parts)
    with pytest.raises(fs.UnsafePath):
        fs.make_dirs(tree.fd, ["dangling_out"])
    with pytest.raises(NotADirectoryError):
        fs.make_dirs(tree.fd, ["file.txt", "x"])
    assert not (tree.outside / "x").exists()


@pytest.mark.parametrize(
    "parts", [[".."], ["..", "escaped"], ["sub", "..", "..", "escaped"], ["dirlink_out/x"]]
)
def test_make_dirs_refuses_parts_that_leave_the_folder(
    resolver: str, tree: Tree, parts: list[str]
) -> None:
    # parts were used as given: ['..', 'x'] made base/x beside the jail
    with pytest.raises(fs.UnsafePath):
        fs.make_dirs(tree.fd, parts)
    assert not (tree.base / "escaped").exists()
    assert not (tree.outside / "x").exists()


@pytest.mark.parametrize("parts", [[""], ["."], ["a\x00b"], ["sub", "a/b"]])
def test_make_dirs_refuses_malformed_parts(resolver: str, tree: Tree, parts: list[str]) -> None:
    with pytest.raises(fs.UnsafePath):
        fs.make_dirs(tree.fd, parts)


@pytest.mark.parametrize("name", ["..", ".", "", "dirlink_out/dir", "sub/deep", "a\x00b"])
def test_remove_tree_takes_one_name(resolver: str, tree: Tree, name: str) -> None:
    # the name went to shutil.rmtree as a path: '..' emptied the jail's parent and
    # 'link/dir' removed the folder the link points to
    with pytest.raises(fs.UnsafePath):
        fs.remove_tree(tree.fd, name)
    assert (tree.jail / "sub" / "deep" / "x").exists()


def test_remove_tree_refuses_a_link(resolver: str, tree: Tree) -> None:
    for name in ("dirlink_out", "abs_dirlink_out", "dirlink_in"):
        with pytest.raises(fs.UnsafePath):
            fs.remove_tree(tree.fd, name)
    with pytest.raises(NotADirectoryError):
        fs.remove_tree(tree.fd, "file.txt")


def test_remove_tree_deeper_than_the_python_stack(resolver: str, tree: Tree) -> None:
    # shutil.rmtree recursed once per level: a deep job folder was a RecursionError
    # with half of it removed
    fd = os.open(tree.jail, os.O_RDONLY)
    for _ in range(1100):  # Python's default recursion limit is 1000
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.mkfifo("fifo", dir_fd=fd)
    os.symlink("../../../../../outside", "up", dir_fd=fd)
    os.close(fd)
    try:
        with deadline(10):
            fs.remove_tree(tree.fd, "d")
        assert not (tree.jail / "d").exists()
    finally:
        # pytest cleans its temporary folders with shutil.rmtree: leave nothing this deep
        subprocess.run(["rm", "-rf", "--", str(tree.jail / "d")], check=True)


def test_rename_noreplace_with_folder_descriptors_stays_beneath(resolver: str, tree: Tree) -> None:
    # with folder descriptors, a link on the way was followed: 'dirlink_out/secret'
    # pulled the outside file in, 'x' -> 'dirlink_out/x' pushed a file out
    for src, dst in (
        ("dirlink_out/secret", "stolen"),
        ("file.txt", "dirlink_out/planted"),
        ("abs_dirlink_out/dir", "stolen"),
        ("../outside/secret", "stolen"),
        ("file.txt", "../planted"),
        ("file.txt\x00", "x"),
    ):
        with pytest.raises(fs.UnsafePath):
            fs.rename_noreplace(src, dst, src_dir_fd=tree.fd, dst_dir_fd=tree.fd)
    assert (tree.jail / "file.txt").read_bytes() == b"hello"
    fs.rename_noreplace("sub/deep/x", "empty/y", src_dir_fd=tree.fd, dst_dir_fd=tree.fd)
    assert (tree.jail / "empty" / "y").read_bytes() == b"x"


def test_rename_noreplace_refuses_a_nul_instead_of_cutting_the_name(tree: Tree) -> None:
    # ctypes passed b'file.txt\x00x' as 'file.txt': another file was moved
    with pytest.raises(fs.UnsafePath):
        fs.rename_noreplace(str(tree.jail / "file.txt") + "\x00x", str(tree.jail / "moved"))
    with pytest.raises(fs.UnsafePath):
        fs.rename_noreplace(str(tree.jail / "file.txt"), str(tree.jail / "moved") + "\x00x")
    assert (tree.jail / "file.txt").exists()
    assert not (tree.jail / "moved").exists()


@pytest.mark.parametrize("name", ["", ".", "..", "a\x00b", "\udcff\ud800"])
def test_write_atomic_refuses_what_is_not_a_name(resolver: str, tree: Tree, name: str) -> None:
    with pytest.raises(fs.UnsafePath):
        fs.write_atomic(tree.fd, name, b"x")
    assert not [n for n in os.listdir(tree.jail) if n.endswith(fs.TEMP_SUFFIX)]


def test_write_atomic_a_long_multibyte_name(resolver: str, tree: Tree) -> None:
    # the temporary name kept 200 characters: 60 four-byte characters (240 bytes, a
    # valid name) made a 258-byte temporary name and ENAMETOOLONG
    name = "\U0001f600" * 60
    fs.write_atomic(tree.fd, name, b"x")
    assert (tree.jail / name).read_bytes() == b"x"


def test_reading_a_fifo_does_not_open_it(resolver: str, tree: Tree) -> None:
    # the FIFO was opened (O_NONBLOCK) before fstat said NotRegular: that alone lets a
    # writer waiting in open() through
    opened = threading.Event()

    def writer() -> None:
        fd = os.open(tree.jail / "fifo", os.O_WRONLY)  # blocks until a reader opens
        opened.set()
        os.close(fd)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    time.sleep(0.1)
    try:
        for call in (
            lambda: fs.read_file(tree.fd, "fifo", 10),
            lambda: fs.read_tail(tree.fd, "fifo", 10),
            lambda: fs.open_regular(tree.fd, "fifo"),
        ):
            with deadline(), pytest.raises(fs.NotRegular):
                call()
        assert not opened.wait(0.3)
    finally:
        os.close(os.open(tree.jail / "fifo", os.O_RDONLY | os.O_NONBLOCK))
        t.join(5)


def test_appending_to_a_fifo_is_not_regular(resolver: str, tree: Tree) -> None:
    # without a reader the open failed ENXIO, a bare OSError; with one, it was opened
    with deadline(), pytest.raises(fs.NotRegular):
        fs.append(tree.fd, "sub/fifo", b"x")
    reader = os.open(tree.jail / "sub" / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    try:
        with deadline(), pytest.raises(fs.NotRegular):
            fs.open_append(tree.fd, "sub/fifo")
        poller = select.poll()
        poller.register(reader, select.POLLIN)
        assert poller.poll(0) == []  # no writer ever came and went
    finally:
        os.close(reader)


# -- properties: a random tree of traps, random paths, every function ----------------------

NAMES = ["a", "b", "c", "d"]
LINK_TARGETS = ["a", "b/c", ".", "..", "../..", "../outside", "../../outside", "../../../outside"]
LINK_TARGETS += ["../outside/secret", "{out}", "{out}/secret", "{out}/dir", "/dev/zero"]
LINK_TARGETS += ["nowhere", "{self}", "../outside/new", "{out}/new"]

leaves = st.one_of(
    st.tuples(st.just("file"), st.binary(max_size=20)),
    st.tuples(st.just("link"), st.sampled_from(LINK_TARGETS)),
    st.tuples(st.just("fifo")),
    st.tuples(st.just("device")),
)
nodes = st.recursive(
    leaves,
    lambda children: st.tuples(
        st.just("dir"), st.dictionaries(st.sampled_from(NAMES), children, max_size=3)
    ),
    max_leaves=10,
)
trees = st.dictionaries(st.sampled_from([*NAMES, "out", "aout"]), nodes, min_size=1, max_size=5)

SEGMENTS = [*NAMES, "out", "aout", "secret", "dir", "new"] * 4
SEGMENTS += ["..", ".", "", "\x00", "n" * 300, "a\x00b", "TEXT"]
# mostly names that are in the tree, sometimes one that is malformed or arbitrary text
segments = st.sampled_from(SEGMENTS).flatmap(
    lambda s: st.text(max_size=4) if s == "TEXT" else st.just(s)
)
paths = st.builds(
    lambda lead, segs: lead + "/".join(segs),
    st.sampled_from(["", "", "", "", "", "/"]),
    st.lists(segments, min_size=1, max_size=4),
)
OPS = ["read_file", "read_tail", "lstat", "open_beneath", "open_dir", "open_regular"]
OPS += ["entries", "append", "open_append", "write_atomic", "make_dirs", "rename"]
OPS += ["remove", "remove_recursive", "remove_tree"]
OPS += ["exchange"]  # not a call: two names of the jail trade places between calls
calls = st.lists(st.tuples(st.sampled_from(OPS), paths, paths), min_size=1, max_size=12)

# what a call may raise; anything else (ValueError, a bare OSError...) is a finding
DOCUMENTED = (
    fs.UnsafePath,
    fs.NotRegular,
    fs.TooLarge,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
)
DOCUMENTED_ERRNOS = {errno.ENOTEMPTY, errno.ENAMETOOLONG}


def build(folder: Path, spec: dict[str, tuple[object, ...]], outside: Path) -> None:
    for name, node in spec.items():
        path = folder / name
        what = node[0]
        if what == "file":
            path.write_bytes(node[1])  # type: ignore[arg-type]
        elif what == "dir":
            path.mkdir()
            build(path, node[1], outside)  # type: ignore[arg-type]
        elif what == "link":
            target = str(node[1]).replace("{out}", str(outside)).replace("{self}", name)
            os.symlink(target, path)
        elif what == "device" and CAN_MKNOD:
            os.mknod(path, stat.S_IFCHR | 0o600, os.stat("/dev/null").st_rdev)
        else:
            os.mkfifo(path)


def inside(fd: int, jail: Path) -> bool:
    where = fd_path(fd)
    return where == str(jail) or where.startswith(f"{jail}/")


def call(op: str, root: int, rel: str, other: str, jail: Path) -> object:
    """One fs call; what it read, or None. Descriptors it opened are checked and closed."""

    def opened(fd: int) -> None:
        try:
            assert inside(fd, jail), f"{op}({rel!r}) opened {fd_path(fd)}"
        finally:
            os.close(fd)

    if op == "read_file":
        return fs.read_file(root, rel, 1 << 16)
    if op == "read_tail":
        return fs.read_tail(root, rel, 1 << 16)
    if op == "lstat":
        return fs.lstat(root, rel)
    if op in ("open_beneath", "open_dir", "open_regular", "open_append"):
        opened(getattr(fs, op)(root, rel))
    elif op == "entries":
        fd = fs.open_dir(root, rel)
        try:
            list(fs.entries(fd, hidden=True))
        finally:
            opened(fd)
    elif op == "append":
        fs.append(root, rel, b"appended")
    elif op == "write_atomic":
        *parents, name = rel.split("/")
        fd = fs.open_dir(root, "/".join(parents)) if parents else os.dup(root)
        try:
            fs.write_atomic(fd, name, b"written", durable=False)
        finally:
            opened(fd)
    elif op == "make_dirs":
        opened(fs.make_dirs(root, rel.split("/")))
    elif op == "rename":
        fs.rename_noreplace(rel, other, src_dir_fd=root, dst_dir_fd=root)
    elif op == "remove":
        fs.remove(root, rel)
    elif op == "remove_recursive":
        fs.remove(root, rel, recursive=True)
    else:
        fs.remove_tree(root, rel)
    return None


def check_call(
    op: str, root: int, rel: str, other: str, jail: Path, outside_inodes: set[tuple[int, int]]
) -> None:
    try:
        with deadline(10):  # generous: a loaded machine is slow, a blocked call is forever
            got = call(op, root, rel, other, jail)
    except DOCUMENTED:
        return
    except OSError as e:
        assert e.errno in DOCUMENTED_ERRNOS, f"{op}({rel!r}, {other!r}): {e!r}"
        return
    if isinstance(got, os.stat_result):  # a tuple too: looked at first
        assert (got.st_dev, got.st_ino) not in outside_inodes, f"{op}({rel!r}) looked outside"
        return
    if isinstance(got, tuple):
        got = got[0]
    if isinstance(got, bytes):
        assert SENTINEL not in got, f"{op}({rel!r}) read outside"


def exchange_names(root: int, a: str, b: str) -> None:
    """Two entries of the jail itself (a folder and a link, say) trade places.

    Which two is picked from the drawn strings, among the names that are there."""
    names = sorted(os.listdir(root))
    if len(names) >= 2:
        x, y = names[len(a) % len(names)], names[len(b) % len(names)]
        _LIBC.renameat2(root, os.fsencode(x), root, os.fsencode(y), _RENAME_EXCHANGE)


def inodes(base: Path, skip: Path) -> set[tuple[int, int]]:
    """(device, inode) of base and of everything under it but skip."""
    found = {(os.stat(base).st_dev, os.stat(base).st_ino)}
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            st_ = os.lstat(os.path.join(dirpath, name))
            found.add((st_.st_dev, st_.st_ino))
    return found


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=trees, todo=calls)
def test_no_call_leaves_the_folder_blocks_or_raises_a_surprise(
    resolver: str,
    tmp_path: Path,
    spec: dict[str, tuple[object, ...]],
    todo: list[tuple[str, str, str]],
) -> None:
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        outside = make_outside(base)
        jail = base / "jail"
        jail.mkdir()
        build(jail, spec, outside)
        for name, target in (("out", "../outside"), ("aout", str(outside))):
            if name not in spec:
                os.symlink(target, jail / name)
        before = snapshot(base, skip=jail)
        outside_inodes = inodes(base, skip=jail)
        root = fs.open_root(jail)
        try:
            for op, rel, other in todo:
                if op == "exchange":
                    exchange_names(root, rel, other)
                    continue
                check_call(op, root, rel, other, jail, outside_inodes)
                assert snapshot(base, skip=jail) == before, (
                    f"{op}({rel!r}, {other!r}) changed outside"
                )
            assert inside(root, jail)
        finally:
            os.close(root)
    finally:
        shutil.rmtree(base)


# -- a folder swapped for a link to the outside while it is being used ---------------------

_RENAME_EXCHANGE = 2


_LIBC = ctypes.CDLL(None, use_errno=True)


def exchange(a: bytes, b: bytes) -> bool:
    """renameat2(RENAME_EXCHANGE): a and b trade places in one step."""
    return bool(_LIBC.renameat2(-100, a, -100, b, _RENAME_EXCHANGE) == 0)


def use_swapped(root: int, jail: Path, outside_inodes: set[tuple[int, int]]) -> tuple[int, int]:
    """Every kind of fs call through jail/swap once; (calls that worked, refused)."""
    worked = refused = 0

    def fine(fd: int) -> None:
        try:
            assert inside(fd, jail), f"opened {fd_path(fd)}"
        finally:
            os.close(fd)

    steps = [
        lambda: fs.read_file(root, "swap/secret", 1 << 10),
        lambda: fs.read_file(root, "swap/dir/secret", 1 << 10),
        lambda: fs.read_tail(root, "swap/secret", 1 << 10),
        lambda: fs.lstat(root, "swap/dir/secret"),
        lambda: fine(fs.open_dir(root, "swap/dir")),
        lambda: fine(fs.open_regular(root, "swap/secret")),
        lambda: fs.append(root, "swap/log", b"x"),
        lambda: fine(fs.make_dirs(root, ["swap", "made", "deeper"])),
        lambda: fs.remove(root, "swap/made", recursive=True),
        lambda: fs.remove(root, "swap/dir/secret"),
        lambda: fs.rename_noreplace("swap/log", "swap/dir/log", src_dir_fd=root, dst_dir_fd=root),
        lambda: fs.remove(root, "swap/dir/log"),
    ]
    for step in steps:
        try:
            got = step()
        except (fs.UnsafePath, FileNotFoundError, FileExistsError, NotADirectoryError):
            # (a link met on the way and gone again when the error is named can read
            # as NotADirectoryError: still refused, still inside)
            refused += 1
            continue
        worked += 1
        if isinstance(got, os.stat_result):
            assert (got.st_dev, got.st_ino) not in outside_inodes
        elif isinstance(got, tuple):
            assert SENTINEL not in got[0]
        elif isinstance(got, bytes):
            assert SENTINEL not in got
    # put back what the steps removed, through a folder descriptor checked while opened
    try:
        fd = fs.make_dirs(root, ["swap", "dir"])
    except (fs.UnsafePath, NotADirectoryError):
        return worked, refused
    try:
        assert inside(fd, jail)
        fs.write_atomic(fd, "secret", b"inside", durable=False)
    finally:
        os.close(fd)
    return worked, refused


def test_a_folder_swapped_with_a_link_out_never_lets_a_call_out(
    resolver: str, tmp_path: Path
) -> None:
    outside = make_outside(tmp_path)
    jail = tmp_path / "jail"
    (jail / "swap" / "dir").mkdir(parents=True)
    (jail / "swap" / "secret").write_bytes(b"inside")
    (jail / "swap" / "dir" / "secret").write_bytes(b"inside")
    os.symlink(str(outside), jail / "other")  # same names as swap/ has, but outside
    before = snapshot(tmp_path, skip=jail)
    outside_inodes = inodes(tmp_path, skip=jail)
    stop = threading.Event()
    swaps = 0

    def swapper() -> None:
        nonlocal swaps
        a, b = os.fsencode(jail / "swap"), os.fsencode(jail / "other")
        while not stop.is_set():
            swaps += exchange(a, b)

    root = fs.open_root(jail)
    t = threading.Thread(target=swapper, daemon=True)
    t.start()
    worked = refused = 0
    try:
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            with deadline(10):
                w, r = use_swapped(root, jail, outside_inodes)
            worked, refused = worked + w, refused + r
    finally:
        stop.set()
        t.join(10)
        os.close(root)
    assert snapshot(tmp_path, skip=jail) == before
    # the race was real: the folder moved under the calls, some went through, some
    # met the link and were refused
    assert swaps > 10 and worked > 10 and refused > 10, (swaps, worked, refused)


def test_write_atomic_takes_another_temporary_name_when_one_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A temporary name planted ahead (guessed) is neither used nor overwritten."""
    (tmp_path / ".JOB.planted.tmp").write_text("mine")
    names = iter([".JOB.planted.tmp", ".JOB.fresh.tmp"])
    monkeypatch.setattr(fs, "temp_name", lambda name: next(names))
    folder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fs.write_atomic(folder, "JOB", b"{}")
    finally:
        os.close(folder)
    assert (tmp_path / "JOB").read_bytes() == b"{}"
    assert (tmp_path / ".JOB.planted.tmp").read_text() == "mine"
    assert not (tmp_path / ".JOB.fresh.tmp").exists()


def test_create_new_makes_one_file_of_its_own_or_says_none(tmp_path: Path) -> None:
    """Anything at the name (a link, dangling or not, a FIFO, a file) is neither followed,
    opened nor changed."""
    (tmp_path / "target").write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(tmp_path / "fifo")
    folder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in ("target", "link", "dangling", "fifo"):
            assert fs.create_new(folder, name, os.O_WRONLY) is None
        fd = fs.create_new(folder, "new", os.O_WRONLY, 0o600)
        assert fd is not None
        os.close(fd)
    finally:
        os.close(folder)
    assert (tmp_path / "target").read_text() == "keep" and not (tmp_path / "nowhere").exists()
    assert (tmp_path / "new").stat().st_size == 0


# -- Folders, unnamed files ----------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_folders_keep_a_bounded_number_open_and_refuse_links(tmp_path: Path, resolver: str) -> None:
    root = tmp_path / "top"
    for i in range(5):
        (root / "a" / f"d{i}").mkdir(parents=True)
        (root / "a" / f"d{i}" / "f").write_bytes(str(i).encode())
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_bytes(SENTINEL)
    (root / "a" / "out").symlink_to(outside)
    (root / "a" / "in").symlink_to(root / "a" / "d0")
    top = fs.open_root(root)
    folders = fs.Folders(top, keep=2)
    before = _open_fds()
    try:
        for _ in range(2):  # the second round reuses the kept ones, opens the rest again
            for i in range(5):
                with folders.open(f"a/d{i}") as fd:
                    assert fs.read_file(fd, "f", 10) == str(i).encode()
            assert _open_fds() == before + 2
        with folders.open("") as fd:
            assert fd == top
        for rel in ("a/out", "a/in", "a/../a/d0", "a/d0/f"):
            with pytest.raises((fs.UnsafePath, NotADirectoryError)), folders.open(rel):
                pass
        # a kept folder moved away and replaced by a link: the descriptor still holds it
        os.rename(root / "a" / "d0", root / "a" / "moved")
        (root / "a" / "d0").symlink_to(outside)
        with folders.open("a/d0") as fd:
            assert fs.read_file(fd, "f", 100) == b"0"
    finally:
        folders.close()
        os.close(top)
    assert _open_fds() == before - 1


def test_unnamed_file_linked_by_one_name_in_a_folder(tmp_path: Path) -> None:
    top = fs.open_root(tmp_path)
    try:
        try:
            fd = fs.open_unnamed(top, 0o640)
        except OSError:
            pytest.skip("no O_TMPFILE on this file system")
        try:
            os.write(fd, b"data")
            assert os.listdir(tmp_path) == []  # nothing named until linked
            (tmp_path / "taken").symlink_to(tmp_path / "taken-target")
            linked = []
            for how in ("empty-path", "proc"):
                try:
                    fs.link_fd(fd, f"named-{how}", how, dir_fd=top)
                except OSError:
                    continue  # this way is not allowed here (a capability, /proc)
                linked.append(how)
                assert (tmp_path / f"named-{how}").read_bytes() == b"data"
                with pytest.raises(fs.UnsafePath):
                    fs.link_fd(fd, "sub/x", how, dir_fd=top)
                with pytest.raises(FileExistsError):  # a link there is not followed
                    fs.link_fd(fd, "taken", how, dir_fd=top)
            assert linked, "neither way of naming an unnamed file works here"
            assert not (tmp_path / "taken-target").exists()
        finally:
            os.close(fd)
    finally:
        os.close(top)


def test_o_path_is_for_folders_only(tmp_path: Path) -> None:
    """O_PATH | O_NOFOLLOW would open a link at the last name as itself: refused unless
    the caller asks for a folder."""
    (tmp_path / "f").write_text("x")
    (tmp_path / "ln").symlink_to("f")
    top = fs.open_root(tmp_path)
    try:
        with pytest.raises(ValueError, match="O_DIRECTORY"):
            fs.open_beneath(top, "ln", os.O_PATH)
        with pytest.raises((fs.UnsafePath, NotADirectoryError, OSError)):
            fs.open_beneath(top, "ln", os.O_PATH | os.O_DIRECTORY)
    finally:
        os.close(top)
