"""The built-in stage task, run as a real process the way the processor runs it."""

from __future__ import annotations

import fcntl
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from live_service import copies_in_flight, wait_for

from batchingest.staging import (
    MANIFEST,
    TEMP_PREFIX,
    Progress,
    Resolver,
    manifest_bytes,
    read_progress,
)


class Area:
    def __init__(self, tmp: Path) -> None:
        self.archive = tmp / "archive"
        self.staging = tmp / "staging"
        self.job = tmp / "root" / "processing" / "job1"
        for d in (self.archive, self.staging, self.job):
            d.mkdir(parents=True)

    def add(self, rel: str, data: bytes) -> Path:
        path = self.archive / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def manifest(self, ids: list[str]) -> None:
        entries, invalid, unresolved = Resolver(self.archive).resolve(ids)
        assert not invalid and not unresolved
        (self.job / MANIFEST).write_bytes(
            manifest_bytes(entries, self.archive, self.staging, "job1")
        )

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(JOBPATH=str(self.job), JOBNAME="job1", JOBCONTROL=str(self.job / ".ctl"),
                   BATCHINGEST_ARCHIVE=str(self.archive), BATCHINGEST_STAGING=str(self.staging),
                   BATCHINGEST_STAGE_PARALLEL="4", BATCHINGEST_STAGE_VERIFY="0")  # fmt: skip
        env.update(extra)
        return env

    def start(self, **extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "batchingest.tasks.stage"], cwd=self.job, env=self.env(**extra),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def run(self, **extra: str) -> tuple[int, str]:
        p = self.start(**extra)
        out, _ = p.communicate(timeout=120)
        return p.returncode, out

    def temps(self) -> list[Path]:
        return [p for p in self.staging.rglob("*") if p.name.startswith(TEMP_PREFIX)]

    def in_flight(self) -> list[str]:
        return copies_in_flight(self.staging)

    def progress(self) -> Progress | None:
        fd = os.open(self.job, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return read_progress(fd)
        finally:
            os.close(fd)


@pytest.fixture
def area(tmp_path: Path) -> Area:
    return Area(tmp_path)


@pytest.mark.parametrize("unnamed", ["1", "0"])
def test_stages_files_identically_and_skips_them_next_time(area: Area, unnamed: str) -> None:
    ids = [f"d{i % 3}/sub/f{i}.dat" for i in range(20)] + ["top.bin"]
    for i, rel in enumerate(ids):
        area.add(rel, os.urandom(1000 * i + 1))
    big = area.add("big/large.bin", os.urandom(9 << 20))  # copied alone, fsync-ed
    big.chmod(0o640)
    os.utime(big, ns=(1_000_000_000_123, 1_500_000_000_123_456_789))
    area.manifest([*ids, "big/large.bin"])

    code, out = area.run(BATCHINGEST_STAGE_VERIFY="1", BATCHINGEST_STAGE_UNNAMED=unnamed)
    assert code == 0, out
    assert "verifying SHA-256" in out
    for rel in [*ids, "big/large.bin"]:
        src, dst = area.archive / rel, area.staging / rel
        assert dst.read_bytes() == src.read_bytes()
        assert dst.stat().st_mtime_ns == src.stat().st_mtime_ns
        assert dst.stat().st_mode == src.stat().st_mode
        assert f"copied {rel} " in out
    assert area.temps() == []
    progress = area.progress()
    assert progress is not None and progress.error is None
    assert progress.files_staged == progress.files_total == 22
    assert (
        progress.bytes_staged
        == progress.bytes_total
        == sum((area.archive / r).stat().st_size for r in [*ids, "big/large.bin"])
    )

    inodes = {rel: (area.staging / rel).stat().st_ino for rel in ids}
    changed = area.add(ids[0], b"new content")  # the archive file changed: copy again
    code, out = area.run(BATCHINGEST_STAGE_UNNAMED=unnamed)
    assert code == 0, out
    assert (area.staging / ids[0]).read_bytes() == b"new content"
    assert f"copied {ids[0]} " in out
    for rel in ids[1:]:
        assert (area.staging / rel).stat().st_ino == inodes[rel]
        assert f"already staged {rel} " in out
    assert changed.exists()


def test_vanished_file_fails_naming_it_and_rerun_finishes(area: Area) -> None:
    for i in range(10):
        area.add(f"a/f{i}", b"x" * (i + 1))
    area.manifest([f"a/f{i}" for i in range(10)])
    gone = area.archive / "a" / "f3"
    saved = gone.read_bytes()
    gone.unlink()

    code, out = area.run()
    assert code == 1
    assert "a/f3: vanished from the archive" in out
    progress = area.progress()
    assert progress is not None and progress.error is not None
    assert progress.error.startswith("a/f3: vanished from the archive")
    assert progress.files_staged == 9
    assert not (area.staging / "a" / "f3").exists()
    assert (area.staging / "a" / "f9").read_bytes() == b"x" * 10

    inode = (area.staging / "a" / "f9").stat().st_ino
    gone.write_bytes(saved)
    code, out = area.run()
    assert code == 0, out
    assert out.count("\nalready staged a/") == 9 and "copied a/f3 " in out
    assert (area.staging / "a" / "f9").stat().st_ino == inode
    progress = area.progress()
    assert progress is not None and progress.error is None and progress.files_staged == 10


# The stage task with a copy that damages one byte of files named *bad*, as failing
# storage or a faulty copy path would: size and times stay right, only SHA-256 sees it.
CORRUPTING_STAGE = """
import os
from batchingest.tasks import stage

real_copy = stage.Stager.copy

def copy(self, src, dst, size):
    copied = real_copy(self, src, dst, size)
    if "bad" in os.path.basename(os.readlink(f"/proc/self/fd/{src}")):
        first = os.pread(dst, 1, 0)
        os.pwrite(dst, bytes([first[0] ^ 0xFF]), 0)
    return copied

stage.Stager.copy = copy
stage.main()
"""


@pytest.mark.parametrize("unnamed", ["1", "0"])
def test_verify_mismatch_fails_naming_the_file_and_keeps_no_copy(area: Area, unnamed: str) -> None:
    rels = ["v/good.dat", "v/bad.dat", "v/big-bad.bin"]
    area.add(rels[0], os.urandom(5000))
    area.add(rels[1], os.urandom(5000))
    area.add(rels[2], os.urandom(9 << 20))  # copied alone, in pieces
    area.manifest(rels)
    env = area.env(BATCHINGEST_STAGE_VERIFY="1", BATCHINGEST_STAGE_UNNAMED=unnamed)
    p = subprocess.run([sys.executable, "-c", CORRUPTING_STAGE], cwd=area.job, env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    out = p.stdout
    assert p.returncode == 1, out + p.stderr
    for rel in rels[1:]:
        assert f"ERROR {rel}: SHA-256 mismatch: archive " in out
        assert not (area.staging / rel).exists()
    assert "ERROR stage failed" in out
    assert area.temps() == [] and area.in_flight() == []
    assert (area.staging / rels[0]).read_bytes() == (area.archive / rels[0]).read_bytes()
    progress = area.progress()
    assert progress is not None and progress.error is not None
    assert "SHA-256 mismatch" in progress.error and "(and 1 more)" in progress.error
    assert progress.files_staged == 1

    # with a sound copy, running again stages the rest
    code, out = area.run(BATCHINGEST_STAGE_VERIFY="1", BATCHINGEST_STAGE_UNNAMED=unnamed)
    assert code == 0, out
    assert f"already staged, SHA-256 verified {rels[0]} " in out
    for rel in rels:
        assert (area.staging / rel).read_bytes() == (area.archive / rel).read_bytes()


def test_verify_recopies_a_damaged_copy_that_looks_staged(area: Area) -> None:
    """Same size and mtime are not enough with --stage-verify: the bytes are compared."""
    area.add("d/f.dat", os.urandom(6000))
    area.manifest(["d/f.dat"])
    code, out = area.run()
    assert code == 0, out
    staged = area.staging / "d" / "f.dat"
    st = staged.stat()
    with open(staged, "r+b") as f:  # bit rot: same size, same mtime
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    os.utime(staged, ns=(st.st_atime_ns, st.st_mtime_ns))
    code, out = area.run()
    assert code == 0 and "already staged d/f.dat" in out  # without verify: trusted
    code, out = area.run(BATCHINGEST_STAGE_VERIFY="1")
    assert code == 0, out
    assert "d/f.dat: staged copy differs from the archive (SHA-256); copying again" in out
    assert staged.read_bytes() == (area.archive / "d" / "f.dat").read_bytes()


def test_leftover_temporary_files_are_removed(area: Area) -> None:
    area.add("d/f", b"data")
    area.manifest(["d/f"])
    (area.staging / "d").mkdir()
    mine = area.staging / "d" / f"{TEMP_PREFIX}job1.123-0.tmp"
    stale = area.staging / "d" / f"{TEMP_PREFIX}otherjob.9-9.tmp"
    fresh = area.staging / "d" / f"{TEMP_PREFIX}otherjob.9-10.tmp"
    live = area.staging / "d" / f"{TEMP_PREFIX}job1.9-11.tmp"
    for p in (mine, stale, fresh, live):
        p.write_bytes(b"partial")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    with open(live, "rb") as held:  # a copy still running elsewhere holds its lock
        fcntl.flock(held, fcntl.LOCK_EX)
        code, out = area.run()
    assert code == 0, out
    assert "removed 2 temporary files" in out
    assert not mine.exists() and not stale.exists()
    assert fresh.exists() and live.exists()
    assert (area.staging / "d" / "f").read_bytes() == b"data"


def test_a_probe_left_by_a_killed_task_is_removed(area: Area) -> None:
    """The test of unnamed files names one in the top folder for an instant."""
    area.add("d/f", b"data")
    area.manifest(["d/f"])
    probe = area.staging / f"{TEMP_PREFIX}probe.77-0.tmp"
    probe.write_bytes(b"")
    os.utime(probe, (time.time() - 3600, time.time() - 3600))
    code, out = area.run()
    assert code == 0, out
    assert not probe.exists() and "removed 1 temporary files" in out


@pytest.mark.parametrize("unnamed", ["1", "0"])
def test_killed_mid_copy_leaves_no_partial_file_and_rerun_finishes(
    area: Area, unnamed: str
) -> None:
    rels = [f"k/f{i}.bin" for i in range(6)]
    for rel in rels:
        area.add(rel, os.urandom(32 << 20))
    area.manifest(rels)
    p = area.start(BATCHINGEST_STAGE_PARALLEL="2", BATCHINGEST_STAGE_VERIFY="1",
                   BATCHINGEST_STAGE_UNNAMED=unnamed)  # fmt: skip
    in_flight = area.in_flight if unnamed == "1" else area.temps
    wait_for(in_flight, timeout=60, interval=0.001, what="a copy in flight")
    p.send_signal(signal.SIGKILL)
    p.wait()
    # unnamed copies vanish with the process; named ones stay hidden until the next run
    leftovers = area.temps()
    if unnamed == "1":
        assert leftovers == []
    # under its real name a file is complete or absent
    for rel in rels:
        dst = area.staging / rel
        if dst.exists():
            assert dst.read_bytes() == (area.archive / rel).read_bytes()
    code, out = area.run(BATCHINGEST_STAGE_UNNAMED=unnamed)
    assert code == 0, out
    assert area.temps() == []
    for rel in rels:
        assert (area.staging / rel).read_bytes() == (area.archive / rel).read_bytes()
    if leftovers:
        assert f"removed {len(leftovers)} temporary files" in out


def test_staging_folder_leading_outside_is_refused(area: Area, tmp_path: Path) -> None:
    area.add("esc/f", b"data")
    area.manifest(["esc/f"])
    outside = tmp_path / "outside"
    outside.mkdir()
    (area.staging / "esc").symlink_to(outside)
    code, out = area.run()
    assert code == 1
    assert "esc/f: staging folder esc: a symbolic link is in the way" in out
    assert list(outside.iterdir()) == []


def test_archive_symlink_swapped_in_after_the_request_is_refused(
    area: Area, tmp_path: Path
) -> None:
    area.add("s/f", b"data")
    area.manifest(["s/f"])
    (area.archive / "s" / "f").unlink()
    (tmp_path / "secret").write_text("secret")
    (area.archive / "s" / "f").symlink_to(tmp_path / "secret")
    code, out = area.run()
    assert code == 1
    assert "s/f: in the archive: a symbolic link is in the way" in out
    assert not (area.staging / "s" / "f").exists()


@pytest.mark.parametrize(
    ("manifest", "expect"),
    [(None, "no MANIFEST.json"),
     ('{"files": [{"id": "x", "path": "../../etc/passwd", "size": 1}]}', "'..' path segment"),
     ('{"files": [{"id": "x", "path": "/etc/passwd", "size": 1}]}', "not relative")],
)  # fmt: skip
def test_bad_manifest_fails_before_copying(area: Area, manifest: str | None, expect: str) -> None:
    if manifest is not None:
        (area.job / MANIFEST).write_text(manifest)
    code, out = area.run()
    assert code == 2
    assert expect in out
    progress = area.progress()
    assert progress is not None and progress.error is not None and expect in progress.error
    assert list(area.staging.iterdir()) == []


def test_without_staging_settings_it_fails_clearly(area: Area) -> None:
    area.add("f", b"x")
    area.manifest(["f"])
    env = area.env()
    del env["BATCHINGEST_STAGING"]
    p = subprocess.run([sys.executable, "-m", "batchingest.tasks.stage"], cwd=area.job, env=env,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 2
    assert "BATCHINGEST_STAGING is not set" in p.stdout


def test_full_staging_area_fails_naming_the_file(area: Area) -> None:
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(area.staging)],
                      capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("cannot mount a small tmpfs here")
    try:
        area.add("s/small", b"s" * 1000)
        area.add("s/huge", os.urandom(3 << 20))
        area.manifest(["s/small", "s/huge"])
        code, out = area.run(BATCHINGEST_STAGE_PARALLEL="1")
        assert code == 1
        assert "s/huge: staging area: No space left on device" in out
        progress = area.progress()
        assert progress is not None and progress.error is not None
        assert "No space left on device" in progress.error
        assert area.temps() == []
        assert not (area.staging / "s" / "huge").exists()
    finally:
        subprocess.run(["umount", "-l", str(area.staging)], check=False)
    json.loads((area.job / "PROGRESS.json").read_text())


def test_many_small_files_under_a_low_descriptor_limit(area: Area) -> None:
    rels = [f"m/d{i % 7}/f{i}" for i in range(700)]
    for i, rel in enumerate(rels):
        area.add(rel, str(i).encode())
    area.manifest(rels)

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400))

    p = subprocess.run([sys.executable, "-m", "batchingest.tasks.stage"], cwd=area.job,
                       env=area.env(BATCHINGEST_STAGE_PARALLEL="4"), preexec_fn=low_limit,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    for i, rel in enumerate(rels):
        assert (area.staging / rel).read_bytes() == str(i).encode()


# -- the job folder is user input ---------------------------------------------------------------


def test_manifest_link_is_refused_not_followed(area: Area, tmp_path: Path) -> None:
    """A job copied in with `cp -r` keeps links: its MANIFEST.json may lead anywhere."""
    area.add("secret/s.txt", b"secret")
    elsewhere = tmp_path / "elsewhere.json"
    entries, _, _ = Resolver(area.archive).resolve(["secret/s.txt"])
    elsewhere.write_bytes(manifest_bytes(entries, area.archive, area.staging, "x"))
    (area.job / MANIFEST).symlink_to(elsewhere)
    code, out = area.run()
    assert code == 2, out
    assert "ERROR stage: MANIFEST.json cannot be read: a symbolic link is in the way" in out
    assert list(area.staging.iterdir()) == []
    progress = area.progress()
    assert progress is not None and progress.error is not None
    assert "symbolic link" in progress.error


def test_manifest_fifo_or_too_big_fails_at_once(area: Area) -> None:
    os.mkfifo(area.job / MANIFEST)
    code, out = area.run()  # a blocking read of the FIFO would hang here
    assert code == 2 and "not a regular file (named pipe)" in out
    os.unlink(area.job / MANIFEST)
    # one id at most: 64 KiB + 1 MiB of body + 8,300 bytes
    (area.job / MANIFEST).write_bytes(b'{"files": []}' + b" " * (2 << 20))
    code, out = area.run(BATCHINGEST_STAGING_MAX_IDS="1")
    assert code == 2 and "MANIFEST.json cannot be read: larger than" in out


def test_progress_that_cannot_be_written_is_a_clear_error(area: Area) -> None:
    area.add("f", b"x")
    area.manifest(["f"])
    (area.job / "PROGRESS.json").mkdir()
    (area.job / "PROGRESS.json" / "x").write_text("in the way")
    code, out = area.run()
    assert code == 2, out
    assert "ERROR stage: PROGRESS.json cannot be written" in out
    assert "Traceback" not in out
    assert not (area.staging / "f").exists()


def test_with_a_catalog_only_catalog_ids_are_staged(area: Area, tmp_path: Path) -> None:
    """A hand-made manifest's paths are ignored: ids are resolved through the catalog."""
    area.add("public/p.txt", b"public")
    area.add("private/s.txt", b"secret")
    catalog = tmp_path / "catalog.tsv"
    catalog.write_text("id-public\tpublic/p.txt\n")
    (area.job / MANIFEST).write_text(json.dumps({"files": [
        {"id": "id-public", "path": "private/s.txt", "size": 6},  # the path is a lie
        {"id": "private/s.txt", "path": "private/s.txt", "size": 6},  # not a catalog id
    ]}))  # fmt: skip
    code, out = area.run(BATCHINGEST_CATALOG=str(catalog))
    assert code == 1, out
    assert "ERROR id 'private/s.txt': not in the catalog" in out
    assert "1 of 2 paths in MANIFEST.json differ from the catalog" in out
    assert (area.staging / "public" / "p.txt").read_bytes() == b"public"
    assert not (area.staging / "private").exists()
    progress = area.progress()
    assert progress is not None and progress.files_total == 2 and progress.files_staged == 1
    assert progress.error == "id 'private/s.txt': not in the catalog"
