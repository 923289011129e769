"""The archive and the staging area are endpoint folders, so user input: the stage task,
run as a real process, never follows a link in them (leading out or not), never opens a
FIFO or device, never takes '..', and fails only the file concerned, with a message."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_staging_task import Area

from batchingest import fs
from batchingest.staging import MANIFEST, TEMP_PREFIX, TEMP_SUFFIX, Entry, manifest_bytes
from batchingest.tasks.stage import remove_leftovers

LINK_REFUSED = "a symbolic link is in the way (links are never followed)"


class OpenWatch:
    """A FIFO that tells whether anyone opened it: a writer waits in open() until a
    reader comes (O_NONBLOCK or not), and says so."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self.opened = threading.Event()
        self.thread = threading.Thread(target=self._wait, daemon=True)
        self.thread.start()
        time.sleep(0.05)  # the writer is in open() before anything else runs

    def _wait(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        self.opened.set()
        os.close(fd)

    def release(self) -> bool:
        """Whether it was opened before this call; lets the writer go either way."""
        was = self.opened.is_set()
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self.thread.join(5)
        os.close(fd)
        return was


def snapshot(folder: Path) -> dict[str, tuple[int, bytes | None, int]]:
    """Every entry below folder: its type, its content (regular files) and mtime."""
    found: dict[str, tuple[int, bytes | None, int]] = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        data = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
        found[str(p.relative_to(folder))] = (stat.S_IFMT(st.st_mode), data, st.st_mtime_ns)
    return found


def hand_manifest(area: Area, paths: list[str]) -> None:
    """A manifest naming paths as written (a hand-made one: the API's resolver would
    refuse these), sizes 1."""
    entries = [Entry(p, p, 1) for p in paths]
    (area.job / MANIFEST).write_bytes(manifest_bytes(entries, area.archive, area.staging, "j"))


def staged_files(area: Area, planted: tuple[str, ...] = ()) -> dict[str, bytes]:
    """The regular files of the staging area; no link there but those the test planted."""
    out = {}
    for p in area.staging.rglob("*"):
        rel = str(p.relative_to(area.staging))
        if p.is_symlink():
            assert rel in planted, f"a link the stage task made or left: {rel}"
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


@pytest.fixture
def area(tmp_path: Path) -> Area:
    return Area(tmp_path)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside both areas that must stay as it is: a secret, and a watched FIFO."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_bytes(b"secret")
    (folder / "f").write_bytes(b"secret f")
    return folder


def test_links_in_the_archive_are_refused_inside_or_out(
    area: Area, tmp_path: Path, outside: Path
) -> None:
    area.add("ok/g", b"good")
    area.add("real/f", b"inside")
    (area.archive / "lnkin").symlink_to(area.archive / "real")  # a folder link, inside
    (area.archive / "lnkout").symlink_to(outside)  # a folder link, out
    (area.archive / "s").mkdir()
    (area.archive / "s" / "in").symlink_to(area.archive / "real" / "f")  # a file link, inside
    (area.archive / "s" / "out").symlink_to(outside / "secret.txt")
    watch = OpenWatch(outside / "pipe")
    (area.archive / "s" / "pipe").symlink_to(outside / "pipe")
    before = snapshot(outside)
    bad = ["lnkin/f", "lnkout/secret.txt", "lnkout/pipe", "s/in", "s/out", "s/pipe"]
    hand_manifest(area, ["ok/g", *bad])

    code, out = area.run()
    opened = watch.release()
    assert code == 1, out
    for rel in bad:
        assert f"ERROR {rel}: in the archive: {LINK_REFUSED}" in out
    assert staged_files(area) == {"ok/g": b"good"}
    assert not opened
    assert snapshot(outside) == before
    progress = area.progress()
    assert progress is not None and progress.files_staged == 1 and progress.files_total == 7
    assert progress.error is not None and progress.error.startswith("lnkin/f: in the archive")


def test_a_fifo_or_device_in_the_archive_is_never_opened(area: Area) -> None:
    area.add("ok/g", b"good")
    (area.archive / "p").mkdir()
    watch = OpenWatch(area.archive / "p" / "pipe")
    paths = ["p/pipe", "ok/g"]
    try:
        os.mknod(area.archive / "p" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        paths.append("p/null")
    except PermissionError:
        pass  # no devices here: the FIFO stands for them
    hand_manifest(area, paths)

    code, out = area.run()
    opened = watch.release()
    assert code == 1, out
    assert not opened, "the FIFO was opened"
    assert "ERROR p/pipe: in the archive: not a regular file (named pipe), not opened" in out
    if "p/null" in paths:
        assert "ERROR p/null: in the archive: not a regular file (device), not opened" in out
    assert staged_files(area) == {"ok/g": b"good"}


@pytest.mark.parametrize("unnamed", ["1", "0"])
def test_links_in_the_staging_area_are_never_followed(
    area: Area, outside: Path, unnamed: str
) -> None:
    for rel in ("esc/f", "in/f", "a/f", "ok/g"):
        area.add(rel, rel.encode())
    (area.staging / "esc").symlink_to(outside)  # the folder a copy goes to leads out
    (area.staging / "real").mkdir()
    (area.staging / "in").symlink_to(area.staging / "real")  # ... or stays inside
    (area.staging / "a").mkdir()
    (area.staging / "a" / "f").symlink_to(outside / "f")  # a link where the copy goes
    before = snapshot(outside)
    area.manifest(["esc/f", "in/f", "a/f", "ok/g"])

    code, out = area.run(BATCHINGEST_STAGE_UNNAMED=unnamed)
    assert code == 1, out
    assert f"ERROR esc/f: staging folder esc: {LINK_REFUSED}" in out
    assert f"ERROR in/f: staging folder in: {LINK_REFUSED}" in out
    # the link at the copy's own name is replaced by the copy, never written through
    assert "copied a/f " in out
    assert not (area.staging / "a" / "f").is_symlink()
    assert (area.staging / "a" / "f").read_bytes() == b"a/f"
    assert (area.staging / "ok" / "g").read_bytes() == b"ok/g"
    assert list((area.staging / "real").iterdir()) == []
    assert snapshot(outside) == before
    assert area.temps() == []
    progress = area.progress()
    assert progress is not None and progress.files_staged == 2


SWAPPING_STAGE = """
import os, sys
from batchingest.tasks import stage

archive, staging, outside = sys.argv[1:4]
real_open_source = stage.Stager.open_source

def open_source(self, rel):
    if rel == "d/f2":
        # after the listing (the request) and the first copy, both folders of d/ are
        # moved aside and links out put in their place
        for area in (archive, staging):
            os.rename(os.path.join(area, "d"), os.path.join(area, "d.moved"))
            os.symlink(outside, os.path.join(area, "d"))
    if rel == "e/g":
        # the file itself, listed as a file, is a link out by the time it is opened
        os.unlink(os.path.join(archive, "e", "g"))
        os.symlink(os.path.join(outside, "secret.txt"), os.path.join(archive, "e", "g"))
    return real_open_source(self, rel)

stage.Stager.open_source = open_source
stage.main()
"""


def test_folders_and_files_swapped_for_links_mid_run_lead_nowhere(
    area: Area, outside: Path
) -> None:
    """What was opened is used by descriptor: a folder swapped for a link after it was
    opened changes nothing (a path string resolved again would lead out); a file
    swapped for a link between the listing and its copy is refused."""
    for name in ("f1", "f2", "f3"):
        area.add(f"d/{name}", name.encode())
    area.add("e/g", b"g")
    area.manifest(["d/f1", "d/f2", "d/f3", "e/g"])
    watch = OpenWatch(outside / "f2")
    before = snapshot(outside)
    p = subprocess.run(
        [sys.executable, "-c", SWAPPING_STAGE, str(area.archive), str(area.staging), str(outside)],
        cwd=area.job, env=area.env(BATCHINGEST_STAGE_PARALLEL="1"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    opened = watch.release()
    assert (area.archive / "d").is_symlink() and (area.staging / "d").is_symlink()
    assert not opened
    assert snapshot(outside) == before
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"ERROR e/g: in the archive: {LINK_REFUSED}" in p.stdout
    # the copies went on into the staging folder opened at first, from the archive
    # folder opened at first
    staged = staged_files(area, planted=("d",))
    assert staged == {f"d.moved/{n}": n.encode() for n in ("f1", "f2", "f3")}


# "sout" is a real folder in the archive but a link out in the staging area: the staging
# side's refusal is reached (a link of the same name in the archive would fail first)
_SEGMENT = st.sampled_from(
    ["ok", "f", "..", ".", "", "lnkin", "lnkout", "sout", "pipe", "secret.txt"]
)
_PATH = st.lists(_SEGMENT, min_size=1, max_size=4).map("/".join)


@given(paths=st.lists(_PATH, min_size=1, max_size=4, unique=True))
@example(paths=["sout/f", "ok/f"])  # the staging side's link, always
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_no_manifest_path_leads_out_of_either_area(tmp_path: Path, paths: list[str]) -> None:
    area = Area(Path(tempfile.mkdtemp(dir=tmp_path)))
    outside = area.archive.parent / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    (outside / "f").write_bytes(b"secret f")
    area.add("ok/f", b"ok f")
    area.add("f", b"top f")
    (area.archive / "lnkin").symlink_to(area.archive / "ok")
    (area.archive / "lnkout").symlink_to(outside)
    (area.staging / "lnkout").symlink_to(outside)
    area.add("sout/f", b"sout f")
    (area.staging / "sout").symlink_to(outside)
    watches = [OpenWatch(outside / "pipe"), OpenWatch(area.archive / "ok" / "pipe")]
    before = snapshot(outside)
    hand_manifest(area, paths)

    code, out = area.run()
    assert not any([w.release() for w in watches]), "a FIFO was opened"
    assert snapshot(outside) == before
    staged = staged_files(area, planted=("lnkout", "sout"))
    plain = [p for p in paths if not {"", ".", ".."} & set(p.split("/"))]
    if len(plain) < len(paths):  # a malformed path: the manifest is refused whole
        assert code == 2, out
        assert f"ERROR stage: {MANIFEST} files[" in out
        assert staged == {}
        return
    for rel in paths:
        folders = rel.split("/")[:-1]
        linked = {"lnkin", "lnkout"} & set(folders)
        if not linked and (area.archive / rel).is_file() and not (area.archive / rel).is_symlink():
            if folders[:1] == ["sout"]:  # a file in the archive; its staging folder leads out
                assert f"ERROR {rel}: staging folder {'/'.join(folders)}: {LINK_REFUSED}" in out
                assert rel not in staged
            else:
                assert staged[rel] == (area.archive / rel).read_bytes()
        else:
            assert f"ERROR {rel}: " in out
            assert rel not in staged
    assert set(staged) <= set(paths)
    assert code == (0 if len(staged) == len(paths) else 1), out


@pytest.mark.parametrize("unnamed", ["1", "0"])
def test_more_folders_than_are_kept_open(area: Area, unnamed: str) -> None:
    """Past the folders kept open (stage.KEEP_OPEN a side) each is opened for each use:
    the copies, their names and the folders' fsyncs all still happen, and a second run
    finds them staged."""
    rels = [f"many/d{i:03d}/f" for i in range(150)]
    for i, rel in enumerate(rels):
        area.add(rel, str(i).encode())
    area.manifest(rels)
    code, out = area.run(BATCHINGEST_STAGE_UNNAMED=unnamed)
    assert code == 0, out
    assert staged_files(area) == {rel: str(i).encode() for i, rel in enumerate(rels)}
    assert area.temps() == []
    code, out = area.run(BATCHINGEST_STAGE_UNNAMED=unnamed)
    assert code == 0, out
    assert out.count("already staged ") == 150


SWAP_THEN_FAIL = """
import errno, os, sys
from batchingest.tasks import stage

staging, failing = sys.argv[1:3]
stage.KEEP_OPEN = 0  # every staging folder opened for each use, then closed


def swap():
    # the copy's folder is moved aside and a link put at its name (inside, here)
    os.rename(os.path.join(staging, "d"), os.path.join(staging, "d.moved"))
    os.symlink("d.moved", os.path.join(staging, "d"))


class Failing(stage.Stager):
    def fill(self, src, st, p):
        if failing == "fill":
            swap()
            raise stage.SourceError("failed after the swap")
        super().fill(src, st, p)

    def name_copy(self, p, dir_fd):
        if failing == "name":
            swap()
            raise OSError(errno.EIO, "failed after the swap")
        super().name_copy(p, dir_fd)


stage.Stager = Failing
stage.main()
"""


@pytest.mark.parametrize("failing", ["fill", "name"])
def test_a_failed_copy_leaves_no_temporary_in_a_folder_swapped_meanwhile(
    area: Area, failing: str
) -> None:
    """A copy that fails is removed through the folder descriptor it was made in: a
    folder swapped for a link meanwhile is not looked up again by name, which would
    find the link and leave the hidden temporary in the moved folder for ever (the next
    run's sweep looks in the folder the name leads to)."""
    area.add("d/f", b"f")
    area.manifest(["d/f"])
    p = subprocess.run(
        [sys.executable, "-c", SWAP_THEN_FAIL, str(area.staging), failing],
        cwd=area.job, env=area.env(BATCHINGEST_STAGE_UNNAMED="0", BATCHINGEST_STAGE_PARALLEL="1"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 1, p.stdout + p.stderr
    assert "ERROR d/f: " in p.stdout
    assert (area.staging / "d").is_symlink()
    assert list((area.staging / "d.moved").iterdir()) == []


def test_a_fifo_swapped_in_after_the_leftovers_listing_is_not_opened(
    area: Area, monkeypatch: pytest.MonkeyPatch
) -> None:
    """remove_leftovers lstat-s each name it listed before opening it: a FIFO put there
    since the listing is left alone, never opened (not even O_NONBLOCK)."""
    name = f"{TEMP_PREFIX}job1.1-0{TEMP_SUFFIX}"
    watch = OpenWatch(area.staging / name)
    # the listing as it was a moment before: a regular file of that name
    monkeypatch.setattr(fs, "kinds", lambda dir_fd, hidden=False: iter([(name, stat.S_IFREG)]))
    fd = os.open(area.staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        removed = remove_leftovers(fd, "job1")
    finally:
        os.close(fd)
    watch.opened.wait(0.5)  # a writer let through by an open says so from its thread
    assert not watch.release(), "the FIFO was opened"
    assert removed == 0
    assert stat.S_ISFIFO((area.staging / name).lstat().st_mode)
