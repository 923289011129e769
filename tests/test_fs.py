"""The access layer for user folders (batchingest/fs.py): containment, no links, no hangs.

Every test runs twice: with openat2 (where the kernel has it) and with the
component-by-component O_NOFOLLOW fallback, which the module switches to when
`fs._openat2_works` is False.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from batchingest import fs

SENTINEL = b"OUTSIDE-SENTINEL-7f3a9c"


def _kernel_has_openat2() -> bool:
    saved = fs._openat2_works
    fs._openat2_works = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "probe").write_bytes(b"")
            fd = fs.open_root(tmp)
            try:
                os.close(fs.open_beneath(fd, "probe"))
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


def test_open_dir(resolver: str, tree: Tree) -> None:
    fd = fs.open_dir(tree.fd, "sub/deep")
    try:
        assert fd_path(fd) == str(tree.jail / "sub" / "deep")
    finally:
        os.close(fd)
    with pytest.raises(NotADirectoryError):
        fs.open_dir(tree.fd, "file.txt")
    with pytest.raises(NotADirectoryError):
        fs.open_dir(tree.fd, "fifo")
    with pytest.raises(FileNotFoundError):
        fs.open_dir(tree.fd, "nothere")
    for rel in ("dirlink_in", "dirlink_out", "abs_dirlink_out", "dirlink_in/deep"):
        with pytest.raises(fs.UnsafePath):
            fs.open_dir(tree.fd, rel)


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
